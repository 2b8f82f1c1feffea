"""``f8net``: F8Net's "tiny fine-tune" of a float model into a fixed-point one, as a PTQ method.

The authors fine-tune pretrained ResNets for 100 iterations at learning rate 0 without clipping:
only statistics move. So does this method, with no gradient steps at all:

1. the model is converted as for QAT (:func:`mmquant.qat.f8net.prepare_f8net`): fixed-point
   quantizers, each conv folding its BatchNorm; no PACT clipping (the authors' setting), so every
   grid is a plain power of two;
2. the calibration batches run through it in training mode: the fused convs fold the batch
   statistics of the quantized network and update the BatchNorms' running statistics, and the
   activations' fractional lengths follow their statistic;
3. evaluation folds the new running statistics and uses the averaged fractional lengths.

By default (``reset_bn``) the BatchNorm statistics restart and are averaged over the calibration
batches (cumulative average, ``momentum=None``), and so is each activation's statistic (the
layer defaults set the quantizers' ``momentum=None``); FLs are chosen by the MSE grid search
(``fl_search='mse'``), as in the authors' tiny fine-tuning; weights get one FL per output channel.
"""
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..calibrate import calibrate_weights
from ..fold_bn import fold_bn
from ..nn import QConvBN2d
from ..qat.f8net import prepare_f8net
from .base import PTQMethod, bake_standardized_weights, register_ptq


@torch.no_grad()
def update_statistics(model: nn.Module, batches: Iterable, forward_fn: Optional[Callable] = None,
                      passes: int = 1, reset_bn: bool = True, progress=None):
    """Run ``batches`` through ``model`` ``passes`` times in training mode without gradients, so
    that BatchNorm statistics and fractional lengths update; ``reset_bn`` restarts the folded
    BatchNorms' statistics as a cumulative average over these batches."""
    forward_fn = forward_fn or (lambda m, b: m(b))
    batches = list(batches)
    bns = [m.bn for m in model.modules() if isinstance(m, QConvBN2d)]
    momenta = [bn.momentum for bn in bns]
    if reset_bn:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
    was_training = model.training
    model.train()
    try:
        for p in range(passes):
            for i, batch in enumerate(batches):
                forward_fn(model, batch)
                if progress is not None:
                    progress(p * len(batches) + i + 1, passes * len(batches))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)


@register_ptq('f8net')
class F8NetPTQ(PTQMethod):
    """Options: ``passes`` over the calibration batches (default 1), ``reset_bn`` (default True:
    the BatchNorm statistics are re-estimated on the calibration batches alone), ``fold_bn``
    (default False; True folds every BatchNorm into its conv with the float statistics first, as
    the observer methods' option does, so no statistics are re-estimated)."""
    layer_defaults = dict(w_quantizer='fixed', a_quantizer='fixed', w_per_channel=True,
                          w_quantizer_kwargs=dict(fl_search='mse'),
                          a_quantizer_kwargs=dict(fl_search='mse', momentum=None))

    def __init__(self, qconfig=None, bits: Optional[str] = None, passes: int = 1, reset_bn: bool = True,
                 fold_bn: bool = False):
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f'passes={passes!r} must be an integer >= 1')
        for name, value in (('reset_bn', reset_bn), ('fold_bn', fold_bn)):
            if not isinstance(value, bool):
                raise ValueError(f'{name}={value!r} must be True or False')
        super().__init__(qconfig, bits)
        self.passes = passes
        self.reset_bn = reset_bn
        self.fold_bn = fold_bn

    def convert(self, model: nn.Module, example_forward: Optional[Callable] = None, io_layers=None):
        bake_standardized_weights(model, self.name)
        if self.fold_bn and example_forward is not None:
            fold_bn(model, example_forward)
        return prepare_f8net(model, self.qconfig, example_forward, io_layers=io_layers, share_clip=False)

    def calibrate(self, model, batches, forward_fn=None, progress=None, loss_fn=None):
        update_statistics(model, batches, forward_fn, self.passes, self.reset_bn, progress)
        calibrate_weights(model)          # the FLs of the weights evaluation folds, for the checkpoint
        return []


__all__ = ['F8NetPTQ', 'update_statistics']
