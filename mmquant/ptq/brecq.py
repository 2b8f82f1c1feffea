"""BRECQ (Li et al., ICLR 2021): block reconstruction with AdaRound, torch only.

1. Initial grids: per-channel affine weight grids (scale and zero point, as the paper and the
   authors' code use: at 2 bits the four levels then span the channel's own range instead of
   wasting one on a symmetric grid's unused side; on the Fashion-MNIST ResNet-18, brecq with 4
   iterations per unit, all but round-to-nearest, gives W2 25.4% top-1 with symmetric grids and
   74.3% with affine ones) from an Lp search of the clipping range, and activation ranges by the
   same search on calibration histograms (the ``mse`` observers). A config's qconfig may still
   ask for symmetric weights.
2. Units (:func:`find_units`): residual blocks whole, every other quantized layer alone, inside
   its conv-norm-act wrapper where it has one (or the modules a config names), in execution order.
3. For each unit: its float output on the calibration batches is the target (the float weights of
   the units already reconstructed are swapped back in for it); its input comes
   from the network whose earlier units are already quantized (the later ones float); the unit
   learns its weight rounding (AdaRound) and its activation steps (LSQ) on minibatches drawn from
   that cache (:func:`reconstruct`), optionally with QDrop.
"""
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..calibrate import calibrate as observe_ranges
from ..calibrate import disabled
from ..convert import all_quantizers, quant_layers
from ..quantizers.scheme import check_bits
from .base import PTQMethod, register_ptq
from .blocks import Unit, find_units
from .mixed_precision import choose_bits, set_weight_bits
from .reconstruct import ReconConfig, cache_loss, reconstruct
from .unit_cache import capture, capture_grads, count_calls

logger = logging.getLogger('mmquant')

__all__ = ['BRECQPTQ', 'BRECQRecord']


@dataclass
class BRECQRecord:
    """What :meth:`BRECQPTQ.calibrate` did to one unit: its output loss on the calibration cache
    with round-to-nearest on the initial grids and after reconstruction (``None``: never ran)."""
    name: str
    layers: List[str]
    loss_rtn: Optional[float]
    loss: Optional[float]
    seconds: float
    samples: int
    iters: int = 0


@register_ptq('brecq')
class BRECQPTQ(PTQMethod):
    """BRECQ as a PTQ method.

    Args:
        qconfig, bits: as for every PTQ method.
        iters: reconstruction iterations per unit (the paper: 20000).
        batch_size: minibatch of cached samples per iteration (32).
        lam: weight of the rounding regulariser (0.01).
        warmup: fraction of iterations before the regulariser starts (0.2).
        lr: Adam learning rate of the rounding variables (default ``None``: the paper's 1e-3 at 20000
            iterations, scaled by ``20000 / iters`` for shorter runs, at most 0.05; see
            :attr:`ReconConfig.v_lr`).
        act_lr: Adam learning rate of each activation step relative to its initial size (4e-3: the
            authors' 4e-4 for a step of 0.1, typical of 4-bit activations; 0 keeps the initial
            steps). Relative because Adam moves a parameter by about its rate per iteration whatever
            its scale: the absolute 4e-4 rewrote 8-bit steps of about 0.03 and cost RetinaNet W4A8
            3.5 bbox mAP points (13.5 -> 10.0).
        drop_prob: QDrop: probability that an activation element stays float while training (0: off).
        loss: ``'mse'`` (squared output error) or ``'fisher'``: each output element's squared error
            weighted by the squared gradient of the task loss with respect to it (the diagonal
            Fisher, taken on the float network and scaled to mean 1 per unit); needs ``loss_fn``.
        blocks: module paths to reconstruct as units instead of the automatic choice.
        fold_bn: fold each BatchNorm into the conv before it before quantizing (the paper does;
            the quantized weights are then the folded ones an integer kernel runs).
        mixed_bits, avg_bits: mixed precision (both or neither): each unit whose layers have the
            default weight bits gets one of ``mixed_bits`` (e.g. ``(2, 4, 8)``), chosen to minimise
            the summed unit sensitivities (output loss with round-to-nearest on the initial grids,
            float inputs, activations float) while those units' weights average at most
            ``avg_bits`` bits per weight; first / last layers keep their bits.
        early_stop: end a unit's reconstruction once every rounding is decided (``h`` within 0.01
            of 0 or 1) and none has flipped for 1000 iterations: the result would not change.
        local_targets: module path prefixes (e.g. ``['roi_head']``) whose units take as targets the
            float unit's own output on the partly quantized network's inputs, instead of the float
            network's output. Needed after a data-dependent selection: a two-stage detector's RoI
            heads see other proposals once its RPN is quantized, so the float network's RoI
            outputs do not pair with them. A unit whose inputs differ in number between the float
            and the quantized pass is treated so too, and the log says which.
        seed: seed of the minibatch sampling and QDrop.
    """
    layer_defaults = dict(w_observer='mse', a_observer='mse', w_per_channel=True, w_symmetric=False)

    def __init__(self, qconfig=None, bits: Optional[str] = None, *, iters: int = 20000, batch_size: int = 32,
                 lam: float = 0.01, warmup: float = 0.2, lr: Optional[float] = None, act_lr: float = 4e-3,
                 drop_prob: float = 0.0, loss: str = 'mse', blocks: Optional[Sequence[str]] = None,
                 mixed_bits: Optional[Sequence[int]] = None, avg_bits: Optional[float] = None,
                 fold_bn: bool = True, early_stop: bool = True, local_targets: Optional[Sequence[str]] = None,
                 seed: int = 0):
        super().__init__(qconfig, bits)
        self.fold_bn = bool(fold_bn)
        if (mixed_bits is None) != (avg_bits is None):
            raise ValueError('brecq: mixed precision needs both mixed_bits (e.g. [2, 4, 8]) and avg_bits (e.g. 4.0)')
        self.mixed_bits = sorted({check_bits(int(b), 'mixed_bits') for b in mixed_bits}) if mixed_bits else None
        self.avg_bits = None if avg_bits is None else float(avg_bits)
        if self.mixed_bits and not self.mixed_bits[0] <= self.avg_bits:
            raise ValueError(f'brecq: avg_bits={self.avg_bits} is below the smallest of mixed_bits {self.mixed_bits}')
        if loss not in ('mse', 'fisher'):
            raise ValueError(f"brecq: unknown loss {loss!r}; accepted: mse, fisher")
        self.loss = loss
        self.recon = ReconConfig(iters=int(iters), batch_size=int(batch_size), lam=float(lam),
                                 warmup=float(warmup), lr=None if lr is None else float(lr), act_lr=float(act_lr),
                                 drop_prob=float(drop_prob), early_stop=bool(early_stop), seed=int(seed))
        self.blocks = list(blocks) if blocks else None
        self.local_targets = [str(p) for p in local_targets or ()]

    def calibrate(self, model: nn.Module, batches, forward_fn: Optional[Callable] = None,
                  progress=None, loss_fn: Optional[Callable] = None) -> List[BRECQRecord]:
        """Reconstruct every unit of the converted ``model`` in place, in execution order; returns
        one :class:`BRECQRecord` per unit. ``progress(k, total)`` counts finished units;
        ``loss_fn(model, batch)`` is the task loss (for ``loss='fisher'``)."""
        batches = list(batches)
        if not batches:
            raise ValueError('calibration needs at least one batch')
        if self.loss == 'fisher' and loss_fn is None:
            raise ValueError("brecq: loss='fisher' needs the task loss: pass loss_fn(model, batch)")
        self._loss_fn = loss_fn
        fwd = forward_fn or (lambda m, b: m(b))
        was_training = model.training
        model.eval()
        try:
            observe_ranges(model, batches, fwd)
            units = {u.name: u for u in find_units(model, self.blocks)}
            calls, order = count_calls(model, {n: u.module for n, u in units.items()}, batches, fwd)
            all_q = all_quantizers(model)
            layer_of = dict(quant_layers(model))
            if self.mixed_bits:
                self._choose_bits(model, units, order, batches, fwd, calls, all_q, layer_of)
            done: List[Unit] = []
            # reconstruction writes each unit's rounded weights into its layers; the targets of
            # later units come from the float network, so the float weights are kept to swap back
            self._float_weights = {}
            records = []
            for k, name in enumerate(order):
                unit = units[name]
                t0 = time.perf_counter()
                rec = self._unit(model, unit, batches, fwd, calls[name], all_q, layer_of, done,
                                 tag=f'{k + 1}/{len(order)} {name}')
                rec.seconds = time.perf_counter() - t0
                records.append(rec)
                done.append(unit)
                if rec.loss is None:
                    logger.info('mmquant brecq: %s never ran on the calibration data (round-to-nearest)', name)
                else:
                    logger.info('mmquant brecq: %s (%d layers) output loss: rtn %.4g -> brecq %.4g (%d samples, '
                                '%d iterations, %.1f s)', name, len(unit.layers), rec.loss_rtn, rec.loss,
                                rec.samples, rec.iters, rec.seconds)
                if progress is not None:
                    progress(k + 1, len(order))
        finally:
            model.train(was_training)
        return records

    def _choose_bits(self, model, units, order, batches, fwd, calls, all_q, layer_of):
        default = self.qconfig.default.w_bits
        search = [n for n in order if any(calls[n]) and all(layer_of[l].weight_quantizer.bits == default
                                                            for l in units[n].layers)]
        counts, losses = [], []                                 # weights per unit, loss per bit width
        for name in search:
            unit = units[name]
            with disabled(all_q):
                streams = capture(model, unit.module, batches, fwd, calls[name], name=name)
            layers = [layer_of[l] for l in unit.layers]
            row = []
            for b in self.mixed_bits:
                for layer in layers:
                    set_weight_bits(layer, b)
                wqs = [layer.weight_quantizer for layer in layers]
                with disabled([q for q in all_q if all(q is not w for w in wqs)]):   # only these weights
                    row.append(cache_loss(unit.module, streams))
            counts.append(sum(layer.weight.numel() for layer in layers))
            losses.append(row)
            all_q[:] = all_quantizers(model)
        sizes = [[n * b for b in self.mixed_bits] for n in counts]
        n = sum(counts)
        choice = choose_bits(sizes, losses, self.avg_bits * n)
        for name, k in zip(search, choice):
            for l in units[name].layers:
                set_weight_bits(layer_of[l], self.mixed_bits[k])
        all_q[:] = all_quantizers(model)
        got = sum(s[k] for s, k in zip(sizes, choice)) / max(n, 1)
        logger.info('mmquant brecq: mixed precision over %d units (%.0f weights), budget %.2f bits per weight, '
                    'chosen %.2f: %s', len(search), n, self.avg_bits, got,
                    ', '.join(f'{name} w{self.mixed_bits[k]}' for name, k in zip(search, choice)))
        for name, row in zip(search, losses):
            logger.info('mmquant brecq: sensitivity of %s: %s', name,
                        ', '.join(f'w{b} {v:.4g}' for b, v in zip(self.mixed_bits, row)))

    @contextmanager
    def _float(self, layer_of):
        """The float weights back in the layers already reconstructed, for the duration."""
        rounded = {n: layer_of[n].weight.detach().clone() for n in self._float_weights}
        try:
            with torch.no_grad():
                for n, w in self._float_weights.items():
                    layer_of[n].weight.copy_(w)
            yield
        finally:
            with torch.no_grad():
                for n, w in rounded.items():
                    layer_of[n].weight.copy_(w)

    def _unit(self, model, unit: Unit, batches, fwd, calls, all_q, layer_of, done, tag='') -> BRECQRecord:
        if not any(calls):
            return BRECQRecord(unit.name, unit.layers, None, None, 0.0, 0)
        t_start = time.perf_counter()
        step = max(100, (self.recon.iters // 10) // 100 * 100)

        def report(t, total, loss):                             # about ten lines per unit, with an ETA
            if t % step == 0 or t == total:
                spent = time.perf_counter() - t_start
                logger.info('mmquant brecq: unit %s: iteration %d/%d, loss %.4g, eta %.0f s',
                            tag, t, total, loss, spent / t * (total - t))
        local = any(unit.name == p or unit.name.startswith(p + '.') for p in self.local_targets)
        streams = None
        if not local:
            with disabled(all_q), self._float(layer_of):        # the float network: targets
                streams = capture(model, unit.module, batches, fwd, calls, name=unit.name)
                if self.loss == 'fisher':
                    grads = capture_grads(model, unit.module, batches, self._loss_fn, name=unit.name)
                    g2 = [grads[(s.call, tuple(s.inputs.shape[1:]))] ** 2 for s in streams]
                    mean = sum(float(g.sum()) for g in g2) / max(1, sum(g.numel() for g in g2))
                    for s, g in zip(streams, g2):
                        s.extra['fisher'] = g / max(mean, 1e-30)
        on = [q for u in done for n in u.layers
              for q in (layer_of[n].weight_quantizer, layer_of[n].input_quantizer) if q is not None]
        off = [q for q in all_q if all(q is not o for o in on)]
        with disabled(off):                                     # earlier units quantized: inputs
            inputs = capture(model, unit.module, batches, fwd, calls, outputs=False, name=unit.name)
        if streams is not None and [s.inputs.shape for s in streams] != [x.inputs.shape for x in inputs]:
            logger.info('mmquant brecq: %s sees other inputs in number once the earlier units are quantized '
                        '(a data-dependent selection such as proposals): its targets are the float unit\'s '
                        'outputs on those inputs', unit.name)
            streams = None
        if streams is None:                                     # targets: the float unit, same inputs
            with disabled(all_q), torch.no_grad():
                for x in inputs:
                    x.outputs = torch.cat([unit.module(c) for c in x.inputs.split(256)])
            streams = inputs
        else:
            for s, x in zip(streams, inputs):
                if self.recon.drop_prob > 0:
                    s.extra['float_inputs'] = s.inputs           # QDrop mixes them in
                s.inputs = x.inputs
        layers = [(n, layer_of[n]) for n in unit.layers]
        for n, layer in layers:
            self._float_weights[n] = layer.weight.detach().clone()
        res = reconstruct(unit.module, layers, streams, self.recon, progress=report)
        return BRECQRecord(unit.name, unit.layers, res.loss_rtn, res.loss, res.seconds,
                           sum(len(s) for s in streams), res.iters)
