"""Calibration: weights from their values, activations from calibration batches."""
import contextlib
import logging
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from .convert import activation_quantizers, quant_layers
from .quantizers import UniformQuantizer

logger = logging.getLogger('mmquant')


@contextlib.contextmanager
def disabled(quantizers: List[UniformQuantizer]):
    """Within the block the quantizers pass their input through unchanged."""
    state = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, s in zip(quantizers, state):
            q.enabled = s


@contextlib.contextmanager
def observing(quantizers: List[UniformQuantizer]):
    """Within the block the quantizers record what they see and let it pass unchanged."""
    for q in quantizers:
        q.observer.reset()
        q.observing = True
    try:
        yield
    finally:
        for q in quantizers:
            q.observing = False


def all_calibrated(model: nn.Module) -> bool:
    """Whether every quantizer of a converted model has its parameters (calibrated or loaded)."""
    return all(bool(q.calibrated) for q in [m.weight_quantizer for _, m in quant_layers(model)] +
               [q for _, q in activation_quantizers(model)])


def calibrate_weights(model: nn.Module):
    """Fit every weight quantizer to the tensor it rounds: the weight, or the BN-folded weight of
    a conv that owns its BatchNorm. Trained quantizers only initialise: what they learned is
    never overwritten."""
    for _, layer in quant_layers(model):
        layer.weight_quantizer.fit(layer.weight_to_quantize().detach())


def calibrate(model: nn.Module, batches: Iterable, forward_fn: Optional[Callable] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> List[str]:
    """Calibrate every quantizer of a converted model; return names of activation quantizers that
    saw no data (their layer never ran) and so stay float.

    Activation ranges are observed on the float network (weights unquantized), as TF-Lite and
    TensorRT calibrate; then the weights are calibrated from their values (after the activations:
    an input quantizer may scale the weight it multiplies, as F8Net's PACT does).

    ``forward_fn(model, batch)`` runs the model on one batch (default ``model(batch)``).
    """
    forward_fn = forward_fn or (lambda m, b: m(b))
    layers = quant_layers(model)
    act = activation_quantizers(model)
    was_training = model.training
    model.eval()
    with observing([q for _, q in act]), disabled([m.weight_quantizer for _, m in layers]), \
            torch.no_grad():
        for i, batch in enumerate(batches):
            forward_fn(model, batch)
            if progress is not None:
                progress(i + 1, len(batches))
    model.train(was_training)
    unseen = []
    for name, q in act:
        if q.observer.seen:
            q.compute_qparams()
        else:
            unseen.append(name)
    calibrate_weights(model)
    if unseen:
        logger.warning('mmquant: %d activation quantizers saw no calibration data and stay float: %s',
                       len(unseen), ', '.join(unseen))
    return unseen
