"""Bias correction: remove the mean output shift that weight rounding causes, per output channel.

Rounding (and clipping) a layer's weights moves the mean of each output channel: for an input
``x`` the shift is ``E[(W_q - W) x]``. ACIQ (Banner et al. 2019) corrects the weights' per-channel
mean and spread; shifting every weight of a channel by a constant is not an integer grid any
more, but its effect on the output is a per-channel constant in expectation, which a bias
absorbs exactly. So, as in data-free quantization's empirical correction (Nagel et al. 2019),
we measure the shift on calibration batches and subtract it from the layer's bias (creating a
zero bias where the layer had none): the integer graph stays ``conv(x_q, W_q) + b``.

The shift of each layer is measured on the inputs the quantized network feeds it (activation
quantizers on), with the layers before it already corrected: one pass per layer, in execution
order, so a correction sees the upstream corrections it will run after.
"""
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..convert import quant_layers


def _channel_mean(y: torch.Tensor, linear: bool):
    """Per-channel sum and count of an output (channels last for Linear, dim 1 otherwise)."""
    y = y.detach().double()
    if linear:
        y = y.reshape(-1, y.shape[-1])
        return y.sum(0), y.shape[0]
    y = y.transpose(0, 1).reshape(y.shape[1], -1)
    return y.sum(1), y.shape[1]


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        channels = layer.out_features if isinstance(layer, nn.Linear) else \
            layer.weight.shape[1] * layer.groups if isinstance(layer, nn.ConvTranspose2d) else layer.out_channels
        layer.bias = nn.Parameter(torch.zeros(channels, device=layer.weight.device, dtype=layer.weight.dtype))
    return layer.bias


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Iterable, forward_fn: Optional[Callable] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, torch.Tensor]:
    """Correct the bias of every quantized layer of a calibrated model; return the applied shifts
    by layer name. Layers whose weight quantizer is disabled are left alone."""
    forward_fn = forward_fn or (lambda m, b: m(b))
    batches = list(batches)
    layers = [(n, m) for n, m in quant_layers(model) if m.weight_quantizer.enabled]
    was_training = model.training
    model.eval()
    shifts = {}
    for k, (name, layer) in enumerate(layers):
        acc = dict(sum=None, n=0, busy=False)
        linear = isinstance(layer, nn.Linear)

        def hook(mod, args, out, acc=acc, linear=linear):
            if acc['busy']:
                return
            acc['busy'] = True
            mod.weight_quantizer.enabled = False
            try:
                ref = mod(*args)
            finally:
                mod.weight_quantizer.enabled = True
                acc['busy'] = False
            s, n = _channel_mean(out - ref, linear)
            acc['sum'] = s if acc['sum'] is None else acc['sum'] + s
            acc['n'] += n

        handle = layer.register_forward_hook(hook)
        try:
            for batch in batches:
                forward_fn(model, batch)
        finally:
            handle.remove()
        if acc['sum'] is not None:
            shift = (acc['sum'] / acc['n']).to(layer.weight.dtype)
            bias = _ensure_bias(layer)
            bias.data -= shift.to(bias.device)
            shifts[name] = shift
        if progress is not None:
            progress(k + 1, len(layers))
    model.train(was_training)
    return shifts
