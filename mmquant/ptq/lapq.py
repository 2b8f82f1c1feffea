"""LAPQ: loss-aware post-training quantization (Nahshan et al., "Loss Aware Post-training
Quantization", Machine Learning 2021), torch + scipy.

1. Lp initialisation: every quantizer (weights and activations) gets the clip that minimises the
   Lp error of its own tensor (the ``mse`` observers with exponent ``p``). The best ``p`` for the
   network is not the best for each layer: the task loss on the calibration batches is measured
   for each ``p`` of ``ps``, a parabola through the best one and its neighbours gives ``p*``.
2. Joint optimisation: starting from the grids at ``p*``, the step sizes of all quantizers are
   optimised together against the task loss with Powell's derivative-free method (the loss is
   piecewise constant in a step size, so gradients are of no use), in log space, one
   coordinate per quantizer (a per-channel grid keeps its channels' ratios), within
   ``[1/4, 2]`` of the start.

The task loss is ``loss_fn(model, batch)`` (labels needed); without one, the mean squared error
of the model's outputs against the float model's.
"""
import logging
import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from ..analysis.sensitivity import flat_outputs, float_outputs
from ..calibrate import calibrate as observe_ranges
from ..convert import activation_quantizers, quant_layers
from .base import PTQMethod, register_ptq

logger = logging.getLogger('mmquant')


def parabola_min(ps: Sequence[float], losses: Sequence[float]) -> float:
    """The ``p`` minimising a parabola through the best measured point and its neighbours,
    kept inside them; the best point itself at an end of ``ps`` or when the fit is not convex.

    >>> parabola_min([2, 3, 4], [1.0, 0.5, 1.0])
    3.0
    >>> round(parabola_min([2, 3, 4], [2.0, 1.0, 2.0 + 1.0]), 3)      # 1 + (x - 2.75)^2 shape
    2.833
    """
    k = min(range(len(ps)), key=lambda i: losses[i])
    if k == 0 or k == len(ps) - 1:
        return float(ps[k])
    (x0, x1, x2), (y0, y1, y2) = ps[k - 1:k + 2], losses[k - 1:k + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return float(x1)
    return float(min(max(-b / (2 * a), x0), x2))


@register_ptq('lapq')
class LAPQPTQ(PTQMethod):
    """Options: ``ps`` the Lp exponents tried for the initial clips; ``max_evals`` the budget of
    loss evaluations of the joint Powell search (0: Lp initialisation only); ``loss_batches``
    how many calibration batches the loss is measured on (None: all); ``bounds`` the range of
    each step size relative to its start."""
    layer_defaults = dict(w_observer='mse', a_observer='mse')

    def __init__(self, qconfig=None, bits=None, ps=(2.0, 2.5, 3.0, 3.5, 4.0), max_evals: int = 400,
                 loss_batches: Optional[int] = None, bounds=(0.25, 2.0)):
        super().__init__(qconfig, bits)
        ps = tuple(float(p) for p in ps)
        if not ps or min(ps) <= 0 or list(ps) != sorted(set(ps)):
            raise ValueError(f'lapq: ps={ps!r} must be increasing exponents > 0')
        if int(max_evals) < 0:
            raise ValueError(f'lapq: max_evals={max_evals!r} must be >= 0')
        lo, hi = (float(b) for b in bounds)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f'lapq: bounds={bounds!r} must satisfy 0 < low <= 1 <= high')
        self.ps, self.max_evals, self.loss_batches, self.bounds = ps, int(max_evals), loss_batches, (lo, hi)
        self.record = {}

    @staticmethod
    def _quantizers(model) -> List[nn.Module]:
        weights = [m.weight_quantizer for _, m in quant_layers(model)]
        acts = [q for _, q in activation_quantizers(model)]
        return [q for q in weights + acts if q.enabled and bool(q.calibrated) and hasattr(q.observer, 'p')]

    @staticmethod
    def _set_p(model, p: float):
        """Recompute every Lp grid at exponent ``p`` (activations from their stored statistics)."""
        for _, q in activation_quantizers(model):
            if hasattr(q.observer, 'p') and q.observer.seen:
                q.observer.p = p
                q.compute_qparams()
        for _, layer in quant_layers(model):
            q = layer.weight_quantizer
            if hasattr(q.observer, 'p'):
                q.observer.p = p
                q.fit(layer.weight_to_quantize().detach())

    def calibrate(self, model, batches, forward_fn=None, progress=None, loss_fn=None):
        fwd = forward_fn or (lambda m, b: m(b))
        batches = list(batches)
        loss_set = batches[:self.loss_batches] if self.loss_batches else batches
        was_training = model.training
        model.eval()
        unseen = observe_ranges(model, batches, fwd)
        ref = float_outputs(model, loss_set, fwd) if loss_fn is None else None

        @torch.no_grad()
        def task_loss() -> float:
            if loss_fn is not None:
                return float(sum(float(loss_fn(model, b)) for b in loss_set) / len(loss_set))
            err = [(flat_outputs(fwd(model, b)) - r).pow(2).mean() for b, r in zip(loss_set, ref)]
            return float(sum(err) / len(err))

        # 1. Lp initialisation: the loss at each p, then the parabola's minimum
        losses = []
        for p in self.ps:
            self._set_p(model, p)
            losses.append(task_loss())
        p_star = parabola_min(self.ps, losses)
        self._set_p(model, p_star)
        init_loss = task_loss()
        if init_loss > min(losses):                       # the parabola missed: keep the best measured p
            p_star = self.ps[min(range(len(losses)), key=lambda i: losses[i])]
            self._set_p(model, p_star)
            init_loss = min(losses)
        logger.info('mmquant lapq: task loss at p=%s: %s; p*=%.3f (loss %.4f)',
                    ', '.join(f'{p:g}' for p in self.ps), ', '.join(f'{v:.4f}' for v in losses), p_star, init_loss)
        self.record = dict(ps=list(self.ps), p_losses=losses, p_star=p_star, init_loss=init_loss)

        # 2. joint Powell search over log step sizes
        final_loss = init_loss
        quantizers = self._quantizers(model)
        if self.max_evals and quantizers:
            final_loss = self._powell(quantizers, task_loss, init_loss, progress)
        self.record.update(final_loss=final_loss, quantizers=len(quantizers))
        logger.info('mmquant lapq: joint search over %d step sizes: loss %.4f -> %.4f',
                    len(quantizers), init_loss, final_loss)
        model.train(was_training)
        return unseen

    def _powell(self, quantizers, task_loss, init_loss, progress) -> float:
        from scipy.optimize import minimize

        start = [q.scale.detach().clone() for q in quantizers]

        def apply(theta):
            for q, s0, t in zip(quantizers, start, theta):
                q.scale.copy_(s0 * math.exp(float(t)))

        evals = dict(n=0, best=init_loss, theta=[0.0] * len(quantizers))

        def objective(theta):
            apply(theta)
            value = task_loss()
            evals['n'] += 1
            if value < evals['best']:
                evals['best'], evals['theta'] = value, list(theta)
            if progress is not None:
                progress(min(evals['n'], self.max_evals), self.max_evals)
            return value

        lo, hi = math.log(self.bounds[0]), math.log(self.bounds[1])
        minimize(objective, [0.0] * len(quantizers), method='Powell', bounds=[(lo, hi)] * len(quantizers),
                 options=dict(maxfev=self.max_evals, xtol=1e-2, ftol=1e-4))
        apply(evals['theta'])                            # the best point evaluated (the start if none beat it)
        self.record['evals'] = evals['n']
        return evals['best']
