"""BitSplit post-training quantization (Wang, Chen, He, Cheng, ICML 2020), registered as ``bitsplit``.

Each layer's weights become ``alpha * v`` with symmetric narrow-range ``M``-bit integers ``v``
split into ``M-1`` ternary bit planes. The planes and the scale are fitted by alternating
optimisation, first on the weights alone and then on the layer's responses to calibration inputs
(see :mod:`mmquant.ptq.bitsplit_solver` for the math). Activation scales are found by alternating
least squares on the observed activation values.

The result is written into the ordinary fake quantizers (weights replaced by ``alpha * v``,
``weight_quantizer.scale = alpha``), so the converted model reproduces it exactly and saves /
loads like any other calibrated model.

Transposed convolutions (and layers that never ran on the calibration batches) get the weight-only
fit (stage 1) only.
"""
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import disabled
from ..convert import all_quantizers, quant_layers
from ..nn import QConvTranspose2d
from .base import PTQMethod, register_ptq
from .bitsplit_solver import (FitResult, als_activation_scale, closed_form_alpha, fit_layer,
                              fit_weight_only, objective, qmax_of, response_problem, rtn_init,
                              split_planes, stitch_planes, update_plane_response,
                              round_to_grid, weight_error)

logger = logging.getLogger('mmquant')

__all__ = ['BitSplitPTQ', 'BitSplitRecord', 'recalibrate_bn', 'weight_groups', 'gather_patches',
           # the math, from bitsplit_solver
           'FitResult', 'als_activation_scale', 'closed_form_alpha', 'fit_layer', 'fit_weight_only',
           'objective', 'qmax_of', 'response_problem', 'rtn_init', 'split_planes', 'stitch_planes',
           'update_plane_response', 'round_to_grid']


@dataclass
class BitSplitRecord:
    """What :meth:`BitSplitPTQ.calibrate` did to one layer. ``fit`` is ``'output'`` (errors are
    relative output errors ``||Y - Y_hat|| / ||Y||`` on the sampled inputs) or ``'weight'``
    (weight-only fit; errors are relative weight errors)."""
    name: str
    w_bits: int
    a_bits: Optional[int]
    err_rtn: float
    err_bitsplit: float
    seconds: float
    fit: str = 'output'
    samples: int = 0


class _StopForward(Exception):
    """Raised by a hook once the layer of interest has seen its input: the rest of the forward
    pass is not needed."""


# --------------------------------------------------------------------------- weights as matrices
def weight_groups(layer: nn.Module) -> torch.Tensor:
    """The weight as ``[g, C, D]`` float32: per group, one row per output channel (conv / linear);
    a transposed conv as one group with its output channels (axis 1) as rows."""
    w = layer.weight.detach().float()
    if isinstance(layer, nn.ConvTranspose2d):
        return w.transpose(0, 1).reshape(1, w.shape[1], -1).clone()
    if isinstance(layer, nn.Conv2d):
        g = layer.groups
        return w.reshape(g, w.shape[0] // g, -1).clone()
    return w.reshape(1, w.shape[0], -1).clone()


def ungroup_weight(layer: nn.Module, wg: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_groups`: a tensor of the layer's weight shape."""
    shape = layer.weight.shape
    if isinstance(layer, nn.ConvTranspose2d):
        return wg.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous()
    return wg.reshape(shape)


def write_back(layer: nn.Module, alpha: torch.Tensor, ints: torch.Tensor):
    """Weights := ``alpha * ints``; the weight quantizer holds ``alpha`` (zero point 0, signed),
    so that its fake quantization returns exactly these weights."""
    wq = layer.weight_quantizer
    alpha = alpha.float()
    with torch.no_grad():
        w = ungroup_weight(layer, ints.float() * alpha)
        layer.weight.data.copy_(w.to(layer.weight.dtype))
        a = alpha.reshape(-1)
        wq.scale.copy_(a if wq.scale.numel() == a.numel() else a[:1].expand_as(wq.scale))
        wq.zero_point.zero_()
        wq.signed.fill_(True)
        wq.calibrated.fill_(True)


# --------------------------------------------------------------------------- im2col on samples
# A transposed conv is a stride-1 conv over its zero-stuffed input (``stride - 1`` zeros between
# pixels, padded by ``dilation * (k - 1) - padding``, plus ``output_padding`` at the end) with the
# kernel flipped; its patches are taken there and flipped back, so that they pair with the
# unflipped rows of :func:`weight_groups`. Only ``groups == 1`` (mmdet's mask upsamplers).
def _is_conv(layer) -> bool:
    return isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))


def _stuffed(layer: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    sh, sw = layer.stride
    n, c, h, w = x.shape
    xs = x.new_zeros(n, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
    xs[:, :, ::sh, ::sw] = x
    return xs


def _conv_geometry(layer, x: torch.Tensor):
    """``(pad, ho, wo, stride)`` of the (equivalent) conv: ``pad`` as ``F.pad``'s
    ``[left, right, top, bottom]`` (negative crops), ``x`` already stuffed for a transposed conv."""
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    if isinstance(layer, nn.ConvTranspose2d):
        (ph, pw), (oh, ow) = layer.padding, layer.output_padding
        pad = [dw * (kw - 1) - pw, dw * (kw - 1) - pw + ow, dh * (kh - 1) - ph, dh * (kh - 1) - ph + oh]
        sh = sw = 1
    else:
        pad = layer._reversed_padding_repeated_twice   # [left, right, top, bottom], also for 'same'
        sh, sw = layer.stride
    hp, wp = x.shape[-2] + pad[2] + pad[3], x.shape[-1] + pad[0] + pad[1]
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    return pad, ho, wo, (sh, sw)


def _as_batched(layer, x):
    x = x.unsqueeze(0) if _is_conv(layer) and x.dim() == 3 else x
    return _stuffed(layer, x) if isinstance(layer, nn.ConvTranspose2d) else x


def num_positions(layer: nn.Module, x: torch.Tensor) -> int:
    """Number of im2col columns (output positions) the input ``x`` gives the layer."""
    x = _as_batched(layer, x)
    if _is_conv(layer):
        _, ho, wo, _ = _conv_geometry(layer, x)
        return x.shape[0] * ho * wo
    return x.numel() // x.shape[-1]


def gather_patches(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The im2col columns ``idx`` (flat over batch and output positions) of the layer's input:
    ``[K, C_in * kh * kw]`` in the channel-major order of ``F.unfold`` (which it equals on the
    selected columns), without unfolding the whole input. Linear layers: the rows ``idx``.
    Transposed convs: the patches of the equivalent conv (see above), so that
    ``weight_groups(layer) @ patch`` is the layer's output at that position."""
    x = _as_batched(layer, x)
    if not _is_conv(layer):
        return x.reshape(-1, x.shape[-1])[idx]
    pad, ho, wo, (sh, sw) = _conv_geometry(layer, x)
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    n, rest = idx // (ho * wo), idx % (ho * wo)
    oh, ow = rest // wo, rest % wo
    xp = F.pad(x, pad)
    rows = (oh * sh).unsqueeze(1) + torch.arange(kh, device=x.device) * dh   # [K, kh]
    cols = (ow * sw).unsqueeze(1) + torch.arange(kw, device=x.device) * dw   # [K, kw]
    p = xp[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]          # [K, kh, kw, C]
    if isinstance(layer, nn.ConvTranspose2d):
        p = p.flip(1, 2)
    return p.permute(0, 3, 1, 2).reshape(idx.numel(), -1)


def inputs_per_output(layer: nn.Module) -> int:
    """``D``: the inputs each output of the layer sums (the width of :func:`weight_groups`)."""
    w = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):
        return w.shape[0] * w[0, 0].numel()
    return w[0].numel()


def patches_to_groups(layer: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """``[K, C_in*kh*kw]`` -> ``[g, D, K]`` (the groups of a grouped conv are contiguous)."""
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    return patches.reshape(patches.shape[0], g, -1).permute(1, 2, 0).contiguous()


# --------------------------------------------------------------------------- sample collection
class _LayerSamples:
    """Seeded samples of one layer's inputs: im2col columns (about ``num_samples``, an equal share
    per calibration batch, split over the calls within a batch) and activation values."""

    def __init__(self, layer, n_batches: int, num_samples: int, act_samples: int, seed: int,
                 want_patches: bool):
        self.layer = layer
        self.n_batches = n_batches
        self.per_batch = max(1, math.ceil(num_samples / n_batches))
        self.act_per_batch = max(1, math.ceil(act_samples / n_batches))
        self.num_samples = num_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.want_patches = want_patches
        self.calls: List[int] = []               # calls per finished batch
        self.cur_calls = 0
        self.pos: Dict[Tuple[int, int], torch.Tensor] = {}
        self.chunks: Dict[Tuple[int, int], torch.Tensor] = {}
        self.values: List[torch.Tensor] = []
        self.vmin, self.vmax, self.amax = math.inf, -math.inf, 0.0
        self.x_quant: Optional[torch.Tensor] = None   # error compensation: quantized-network inputs
        self._final: Optional[torch.Tensor] = None

    @property
    def seen(self) -> bool:
        return bool(self.values)

    def _calls_estimate(self) -> int:
        return max(self.calls[0], 1) if self.calls else 1

    def record(self, x: torch.Tensor, batch: int):
        x = x.detach()
        c = self.cur_calls
        self.cur_calls += 1
        est = self._calls_estimate()
        flat = x.reshape(-1)
        k = min(flat.numel(), max(1, math.ceil(self.act_per_batch / est)))
        sel = torch.randint(flat.numel(), (k,), generator=self.gen).to(flat.device)
        self.values.append(flat[sel].float())
        self.vmin = min(self.vmin, float(flat.min()))
        self.vmax = max(self.vmax, float(flat.max()))
        self.amax = max(self.amax, float(flat.abs().max()))
        if not self.want_patches:
            return
        L = num_positions(self.layer, x)
        k = min(L, max(1, math.ceil(self.per_batch / est)))
        pos = torch.randperm(L, generator=self.gen)[:k].sort().values.to(x.device)
        self.pos[(batch, c)] = pos
        self.chunks[(batch, c)] = gather_patches(self.layer, x, pos).float()

    def end_batch(self, batch: int):
        """Thin this batch's columns to its share (a layer called several times per batch)."""
        self.calls.append(self.cur_calls)
        self.cur_calls = 0
        keys = [key for key in self.pos if key[0] == batch]
        total = sum(self.pos[key].numel() for key in keys)
        if total <= self.per_batch:
            return
        keep = torch.zeros(total, dtype=torch.bool)
        keep[torch.randperm(total, generator=self.gen)[:self.per_batch]] = True
        start = 0
        for key in keys:
            n = self.pos[key].numel()
            mask = keep[start:start + n].to(self.pos[key].device)
            start += n
            self.pos[key] = self.pos[key][mask]
            self.chunks[key] = self.chunks[key][mask]
            if not self.pos[key].numel():
                del self.pos[key], self.chunks[key]

    def keys(self):
        return sorted(self.pos)

    def patches(self, chunks=None) -> torch.Tensor:
        """All sampled columns ``[N, C_in*kh*kw]`` in (batch, call, position) order, thinned to
        ``num_samples`` with the same selection for every set of chunks."""
        chunks = self.chunks if chunks is None else chunks
        if set(chunks) != set(self.pos):
            raise RuntimeError('bitsplit: the layer was called differently in the second pass over the '
                               'calibration batches (error compensation needs a deterministic forward)')
        x = torch.cat([chunks[key] for key in self.keys()])
        if x.shape[0] > self.num_samples:
            if self._final is None:
                self._final = torch.randperm(x.shape[0], generator=self.gen)[:self.num_samples].sort().values
            x = x[self._final.to(x.device)]
        return x

    def activation_values(self) -> torch.Tensor:
        return torch.cat(self.values)


# --------------------------------------------------------------------------- BN re-estimation
def recalibrate_bn(model: nn.Module, batches, forward_fn: Callable) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``batches`` through the
    (quantized) model: cumulative averages (``momentum=None``), BN in train mode, everything else
    in eval mode, no gradients. Returns the number of BN layers re-estimated."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                forward_fn(model, batch)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


# --------------------------------------------------------------------------- the method
@register_ptq('bitsplit')
class BitSplitPTQ(PTQMethod):
    """BitSplit: bit-plane-wise optimisation of the weights of each layer against its output on
    calibration data, with closed-form scales (per output channel by default; per layer with
    ``w_per_channel=False``, as in the paper's tables).

    Args:
        qconfig, bits: as for every PTQ method. Weights must be symmetric.
        num_samples: im2col columns sampled per layer from the calibration activations.
        iters: outer rounds of the response stage (closed-form scale, one sweep per bit plane).
        error_compensation: fit each layer on the inputs produced by the already-quantized layers
            before it (in execution order) against the float network's output of the layer; one
            extra (truncated) pass over the calibration batches per layer.
        bn_recalibration: re-estimate the BatchNorm statistics of the quantized model on the
            calibration batches at the end.
        seed: seed of the sampling.
        act_samples: activation values sampled per layer for the activation scale.
        block_size: columns per block of the plane sweeps (speed only).
        max_inputs: layers whose outputs sum more inputs than this (``D``, e.g. VGG's 25088-wide
            first fully connected layer at 224x224) get the weight-only fit: the output fit needs
            a D x D Gram matrix (2.5 GB at D = 25088) and D sequential column steps per sweep.
        holdout: fraction of each layer's sampled columns kept out of the fit to choose, per
            channel, between the fitted state and round-to-nearest (0: choose on the fitted
            samples, the paper's procedure); see :func:`fit_layer`.
    """
    layer_defaults = dict(w_per_channel=True, w_symmetric=True, w_narrow_range=True, a_symmetric=True)

    def __init__(self, qconfig=None, bits: Optional[str] = None, *, num_samples: int = 4096, iters: int = 4,
                 error_compensation: bool = False, bn_recalibration: bool = False, seed: int = 0,
                 act_samples: int = 1 << 18, block_size: int = 128, max_inputs: int = 16384,
                 holdout: float = 0.0):
        super().__init__(qconfig, bits)
        if num_samples < 1 or iters < 0 or act_samples < 1 or block_size < 1 or max_inputs < 1:
            raise ValueError('bitsplit: num_samples, act_samples, block_size, max_inputs must be >= 1 '
                             'and iters >= 0')
        self.num_samples, self.iters, self.seed = int(num_samples), int(iters), int(seed)
        self.error_compensation, self.bn_recalibration = bool(error_compensation), bool(bn_recalibration)
        self.act_samples, self.block_size = int(act_samples), int(block_size)
        self.max_inputs = int(max_inputs)
        if not 0 <= holdout < 1:
            raise ValueError(f'bitsplit: holdout must be in [0, 1), got {holdout}')
        self.holdout = float(holdout)
        self._check_symmetric(self.qconfig.default.w_symmetric, 'the default layer config')
        for pattern, ov in self.qconfig.overrides.items():
            self._check_symmetric(ov.get('w_symmetric', True), f'override {pattern!r}')

    @staticmethod
    def _check_symmetric(symmetric: bool, where: str):
        if not symmetric:
            raise ValueError(f'bitsplit quantizes weights to symmetric signed integers (zero point 0); '
                             f'{where} sets w_symmetric=False')

    # ---------------------------------------------------------------- passes over the batches
    def _collect(self, model, layers, batches, fwd, hooks: Dict[str, Callable], end_batch=None,
                 stop_after: Optional[str] = None):
        """Run the batches (no grad) with forward pre-hooks ``hooks[name](input, batch_index)``;
        ``end_batch(batch_index)`` after each batch. ``stop_after``: a hooked layer whose number
        of calls per batch is known from the first pass; the forward stops after its last call."""
        handles = []
        batch_no = [0]
        counts: Dict[str, int] = {}

        def make(name, fn):
            def hook(mod, inputs):
                if not inputs or not isinstance(inputs[0], torch.Tensor):
                    return
                fn(inputs[0], batch_no[0])
                counts[name] = counts.get(name, 0) + 1
                if stop_after == name and counts[name] >= self._calls[name][batch_no[0]]:
                    raise _StopForward
            return hook

        mods = dict(layers)
        for name, fn in hooks.items():
            handles.append(mods[name].register_forward_pre_hook(make(name, fn)))
        try:
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    batch_no[0] = b
                    counts.clear()
                    try:
                        fwd(model, batch)
                    except _StopForward:
                        pass
                    if end_batch is not None:
                        end_batch(b)
        finally:
            for h in handles:
                h.remove()

    def calibrate(self, model: nn.Module, batches, forward_fn: Optional[Callable] = None,
                  progress=None, loss_fn: Optional[Callable] = None) -> List[BitSplitRecord]:
        """Quantize every converted layer of ``model`` in place, in execution order; returns one
        :class:`BitSplitRecord` per layer. ``progress(k, total)`` is called with the number of finished
        layers."""
        batches = list(batches)
        if not batches:
            raise ValueError('calibration needs at least one batch')
        fwd = forward_fn or (lambda m, b: m(b))
        layers = quant_layers(model)
        for name, layer in layers:
            if not layer.weight_quantizer.scheme.symmetric:
                self._check_symmetric(False, f'layer {name!r}')
        quantizers = all_quantizers(model)
        state = [q.enabled for q in quantizers]
        was_training = model.training
        model.eval()
        records = []
        try:
            # pass 1, the float network: samples of every layer's input, and the execution order
            samples = {name: _LayerSamples(layer, len(batches), self.num_samples, self.act_samples,
                                           self.seed * 1_000_003 + i,
                                           want_patches=self._fits_output(layer))
                       for i, (name, layer) in enumerate(layers)}
            first_seen: Dict[str, int] = {}

            def sampler(name):
                def fn(x, b):
                    first_seen.setdefault(name, len(first_seen))
                    samples[name].record(x, b)
                return fn

            def end_batch(b):
                for smp in samples.values():
                    smp.end_batch(b)

            with disabled(quantizers):
                self._collect(model, layers, batches, fwd, {n: sampler(n) for n, _ in layers}, end_batch)
            self._calls = {n: smp.calls for n, smp in samples.items()}
            ordered = sorted(layers, key=lambda nl: first_seen.get(nl[0], len(layers)))
            done: List[str] = []
            unseen = []
            for k, (name, layer) in enumerate(ordered):
                t0 = time.perf_counter()
                rec = self._quantize_layer(model, layers, batches, fwd, name, layer, samples.pop(name), done)
                rec.seconds = time.perf_counter() - t0
                records.append(rec)
                done.append(name)
                if name not in first_seen:
                    unseen.append(name)
                a = 'float' if rec.a_bits is None else f'a{rec.a_bits}'
                logger.info('mmquant bitsplit: %s w%d %s, %s error: rtn %.4f -> bitsplit %.4f (%.2f s)',
                            name, rec.w_bits, a, rec.fit, rec.err_rtn, rec.err_bitsplit, rec.seconds)
                if progress is not None:
                    progress(k + 1, len(layers))
            wide = [n for n, layer in ordered if n not in unseen and not self._fits_output(layer)]
            if wide:
                logger.warning('mmquant bitsplit: %d layers fitted on their weights only (grouped transposed '
                               'conv, or more than max_inputs=%d inputs per output): %s',
                               len(wide), self.max_inputs, ', '.join(wide))
            if unseen:
                logger.warning('mmquant bitsplit: %d layers saw no calibration data (weight-only fit, '
                               'activations stay float): %s', len(unseen), ', '.join(unseen))
        finally:
            for q, s in zip(quantizers, state):
                q.enabled = s
            model.train(was_training)
        if self.bn_recalibration:
            n = recalibrate_bn(model, batches, fwd)
            logger.info('mmquant bitsplit: re-estimated %d BatchNorm layers on the quantized model', n)
        return records

    # ---------------------------------------------------------------- one layer
    def _fits_output(self, layer) -> bool:
        """Output reconstruction needs the layer's patches and a D x D Gram matrix: grouped
        transposed convs and layers wider than ``max_inputs`` get the weight-only fit."""
        if isinstance(layer, QConvTranspose2d) and layer.groups != 1:
            return False
        return inputs_per_output(layer) <= self.max_inputs

    def _quantize_layer(self, model, layers, batches, fwd, name, layer, s: _LayerSamples,
                        done: List[str]) -> BitSplitRecord:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        bits, per_channel = wq.bits, bool(wq.scheme.per_channel)
        a_bits = None if aq is None else aq.bits
        w = weight_groups(layer)
        if s.seen and self.error_compensation and done:
            s = self._compensated(model, layers, batches, fwd, name, layer, s, done)
        if aq is not None and s.seen:
            vals = s.activation_values()
            signed = aq.scheme.signed
            if signed is None:
                signed = s.vmin < 0
            top = s.amax if signed else max(s.vmax, 0.0)
            scale, signed = als_activation_scale(vals, aq.bits, signed, max_abs=top,
                                                 narrow_range=aq.scheme.narrow_range)
            with torch.no_grad():
                aq.scale.fill_(scale)
                aq.zero_point.zero_()
                aq.signed.fill_(bool(signed))
                aq.calibrated.fill_(True)
        if not s.seen or not self._fits_output(layer):
            a0, v0 = rtn_init(w, bits, per_channel)
            alpha, ints = fit_weight_only(w, bits, per_channel, alpha=a0, v=v0)
            norm = float((w ** 2).sum()) or 1.0
            err_rtn = math.sqrt(float(weight_error(w, a0, v0).sum()) / norm)
            err = math.sqrt(float(weight_error(w, alpha, ints).sum()) / norm)
            write_back(layer, alpha, ints)
            return BitSplitRecord(name, bits, a_bits, err_rtn, err, 0.0, 'weight', 0)
        w = w.to(layer.weight.device)
        x_float = patches_to_groups(layer, s.patches())
        if s.x_quant is not None:
            xq = s.x_quant
            if aq is not None:
                with torch.no_grad():
                    aq.enabled = True
                    xq = aq(xq)
            res = fit_layer(w, patches_to_groups(layer, xq), bits, per_channel, self.iters,
                            y=torch.bmm(w, x_float), block_size=self.block_size, holdout=self.holdout)
        else:
            res = fit_layer(w, x_float, bits, per_channel, self.iters, block_size=self.block_size,
                            holdout=self.holdout)
        write_back(layer, res.alpha, res.ints)
        return BitSplitRecord(name, bits, a_bits, res.err_rtn, res.err_bitsplit, 0.0, 'output',
                              x_float.shape[-1])

    def _compensated(self, model, layers, batches, fwd, name, layer, s: _LayerSamples, done):
        """Inputs of ``name`` at the sampled positions, produced by the network whose layers in
        ``done`` are quantized (and the rest float); activation values re-sampled from them."""
        mods = dict(layers)
        on = [q for n in done for q in (mods[n].weight_quantizer, mods[n].input_quantizer) if q is not None]
        off = [q for n, m in layers if n not in done for q in (m.weight_quantizer, m.input_quantizer)
               if q is not None]
        chunks = {}
        fresh = _LayerSamples(layer, len(batches), self.num_samples, self.act_samples,
                              self.seed * 1_000_003 + 7919 * (len(done) + 1), want_patches=False)
        fresh.calls = s.calls[:1]   # the same share of activation values per call as in pass 1
        call: Dict[int, int] = {}

        def fn(x, b):
            c = call.get(b, 0)
            call[b] = c + 1
            fresh.record(x, b)
            pos = s.pos.get((b, c))
            if pos is not None:
                chunks[(b, c)] = gather_patches(layer, x.detach(), pos).float()

        for q in on:
            q.enabled = True
        with disabled(off):
            self._collect(model, layers, batches, fwd, {name: fn}, stop_after=name)
        s.x_quant = s.patches(chunks)
        s.values, s.vmin, s.vmax, s.amax = fresh.values, fresh.vmin, fresh.vmax, fresh.amax
        return s

