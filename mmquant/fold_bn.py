"""Fold BatchNorm into the convolution before it, torch only (no tracing).

A conv followed by an inference-mode BatchNorm is one affine map per output channel:
``bn(conv(x)) = conv'(x)`` with ``w' = w * g`` and ``b' = (b - mean) * g + beta``,
``g = gamma / sqrt(var + eps)``. Quantizing ``w'`` instead of ``w`` is what an integer kernel
runs, and what BRECQ and deployment toolchains quantize.

The pairs are found by running the model once: a BatchNorm whose input is the very tensor a
conv returned follows that conv. The BatchNorm becomes ``nn.Identity`` (so mmcv's
``ConvModule.norm`` and mmpretrain's ``norm1`` properties keep working) and the conv gains a
bias if it had none. The model's output on the example is compared before and after; a conv
whose output also feeds something other than its BatchNorm would change it, and is refused.
"""
import contextlib
from typing import Callable, List, Tuple

import torch
from torch import nn

__all__ = ['find_conv_bn_pairs', 'fold_bn']

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def find_conv_bn_pairs(model: nn.Module, example_forward: Callable[[], object]) -> List[Tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm that directly consumes a conv's output. A conv
    whose outputs reach several BatchNorms (a head conv shared across FPN levels with one BN per
    level, :class:`mmquant.det.LevelBN`), or a BatchNorm fed by several convs, has no single fold:
    such pairs are left out."""
    produced = {}
    pairs = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(
                lambda mod, a, out, name=name: produced.__setitem__(id(out), (name, out))))
        elif isinstance(m, _BN):
            def pre(mod, args, name=name):
                hit = produced.get(id(args[0])) if args else None
                if hit is not None and hit[1] is args[0] and (hit[0], name) not in pairs:
                    pairs.append((hit[0], name))
            handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            example_forward()
    finally:
        for h in handles:
            h.remove()
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and bns.count(b) == 1]


@contextlib.contextmanager
def full_precision():
    """Within the block CUDA convolutions and matmuls run in full float32: with TF32 (the
    default for cuDNN convolutions on Ampere and later) the outputs compared before and after a
    rewrite differ by about 3e-4 relative with nothing wrong."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fold_bn(model: nn.Module, example_forward: Callable[[], object], atol: float = 1e-4) -> List[Tuple[str, str]]:
    """Fold every conv -> BatchNorm pair of ``model`` (in eval mode) in place; returns the pairs.
    ``example_forward`` runs the model on one real batch (it is called three times)."""
    was_training = model.training
    model.eval()
    try:
        with full_precision():
            return _fold(model, example_forward, atol)
    finally:
        model.train(was_training)


def _fold(model, example_forward, atol):
    pairs = find_conv_bn_pairs(model, example_forward)
    if not pairs:
        return []
    before = example_forward()
    mods = dict(model.named_modules())
    undo = [(mods[c], mods[c].weight.detach().clone(),
             None if mods[c].bias is None else mods[c].bias.detach().clone(), b, mods[b]) for c, b in pairs]
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(g.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        new_bias = (bias - bn.running_mean) * g + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias)
        _set(model, bn_name, nn.Identity())
    after = example_forward()
    try:
        _check_same(before, after, atol)
    except RuntimeError:                       # leave the model as it was
        for conv, w, b, bn_name, bn in undo:
            conv.weight.copy_(w)
            if b is None:
                conv.bias = None
            else:
                conv.bias.copy_(b)
            _set(model, bn_name, bn)
        raise
    return pairs


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    return []


def _check_same(before, after, atol):
    a, b = _flat(before), _flat(after)
    if len(a) != len(b):
        raise RuntimeError('fold_bn: the model returns a different structure after folding')
    for x, y in zip(a, b):
        err = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(x.abs().max()) if x.numel() else 0.0
        if err > atol * max(1.0, scale):
            raise RuntimeError(f'fold_bn: folding changed the model output by {err:.3g} (a conv output '
                               f'also feeds something other than its BatchNorm?); fold by hand')
