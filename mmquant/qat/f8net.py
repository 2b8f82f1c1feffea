"""Turning a float model into an F8Net fixed-point model (torch only), for the QAT method
``f8net`` and the post-training "tiny fine-tune" ``--quant f8net``.

1. one forward pass finds every conv whose output goes straight into a BatchNorm
   (:func:`mmquant.fold_bn.find_conv_bn_pairs`);
2. the layers are swapped for quantized twins by the qconfig (fixed-point quantizers; the
   input / output layers found by the same forward pass unless ``io_layers`` names them);
3. every such conv becomes a :class:`~mmquant.nn.QConvBN2d` that folds its BatchNorm in training
   and evaluation, the BatchNorm a pass-through keeping its parameters under its own name;
4. with ``share_clip``, the readers of each ResNet residual stream share one PACT clipping level
   (:func:`~mmquant.nn.share_residual_clipping`);
5. with ``fold_clip``, each layer's weights are quantized in units of the clipping level of the
   layers reading its output (:func:`~mmquant.qat.clip_fold.fold_clip_units`), so that the
   integer network rescales between layers by shifts only.

The float output on the example (evaluation mode, quantizers off) must be unchanged by the
rewrite, else a conv output also fed something other than its BatchNorm: one clear error.
"""
from typing import Callable, Optional

import torch
from torch import nn

from ..calibrate import disabled
from ..convert import ConversionReport, all_quantizers, convert
from ..fold_bn import _flat, find_conv_bn_pairs, full_precision
from ..nn import fuse_conv_bn, share_residual_clipping
from ..qconfig import QConfig
from .clip_fold import fold_clip_units


def prepare_f8net(model: nn.Module, qconfig: QConfig, example_forward: Optional[Callable[[], object]],
                  io_layers=None, share_clip: bool = True, fold_clip: bool = False,
                  atol: float = 1e-4) -> ConversionReport:
    """Convert ``model`` in place as the module doc says; the report gains ``fused`` (the
    ``(conv, bn)`` pairs), ``shared_clip`` (the tied residual readers), ``folded_clip`` (the
    ``(producer, reader)`` pairs) and ``unfolded_clip`` (producers whose readers do not share a
    clipping level)."""
    if example_forward is None:
        raise ValueError('f8net finds its conv -> BatchNorm pairs by running the model once: pass '
                         'example_forward (a no-argument callable running the model on one batch)')
    was_training = model.training
    model.eval()
    try:
        with full_precision():
            return _prepare(model, qconfig, example_forward, io_layers, share_clip, fold_clip, atol)
    finally:
        model.train(was_training)


def _prepare(model, qconfig, example_forward, io_layers, share_clip, fold_clip, atol):
    with torch.no_grad():
        before = example_forward()
    pairs = find_conv_bn_pairs(model, example_forward)
    report = convert(model, qconfig, example_forward=example_forward, io_layers=io_layers)
    report.fused = fuse_conv_bn(model, pairs)
    with disabled(all_quantizers(model)), torch.no_grad():
        after = example_forward()
    a, b = _flat(before), _flat(after)
    err = max((float((x - y).abs().max()) / max(1.0, float(x.abs().max())) for x, y in zip(a, b)
               if x.numel()), default=0.0)
    if len(a) != len(b) or err > atol:
        raise ValueError(f'f8net: fusing the conv -> BatchNorm pairs changed the float output (by '
                         f'{err:.3g} relative); a conv output feeds something besides its BatchNorm')
    report.shared_clip = share_residual_clipping(model) if share_clip else []
    report.folded_clip, report.unfolded_clip = fold_clip_units(model, example_forward) if fold_clip else ([], [])
    return report


__all__ = ['prepare_f8net']
