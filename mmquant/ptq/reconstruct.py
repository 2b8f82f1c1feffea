"""Reconstruction of one unit (a residual block or a layer): AdaRound weights, learned activation
steps, optional QDrop, torch only.

The unit's quantized layers keep their grids (scales from the initial calibration); what is
learned is each weight's rounding (:class:`AdaRoundWeight`) and, optionally, the step size of
each activation quantizer inside the unit (LSQ: the gradient of the fake quantizer with respect
to its step, scaled by ``1 / sqrt(n * qmax)``), with Adam at a rate relative to each step's
initial size. The loss is the squared error of the unit's output
against the float network's output, summed over channels and averaged over samples and
positions, optionally weighted element-wise (Fisher diagonal), plus ``lam`` times the rounding
regulariser once the warm-up is over. With ``drop_prob > 0`` (QDrop, Wei et al., ICLR 2022) each
activation element stays float with that probability during training, at the unit's input too
(the element of the float network's input replaces that of the partly quantized network, when
the streams carry ``extra['float_inputs']``). At the end every rounding is made hard and written into
the layer's weight, so the layer's ordinary fake quantization reproduces it exactly; where the
result is worse than round-to-nearest on the cache (rare: a too strong regulariser), the unit
keeps round-to-nearest and its initial steps.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..quantizers.functional import fake_quantize
from ..quantizers.lsq import grad_scale
from .adaround import AdaRoundWeight, BetaSchedule
from .unit_cache import Stream

__all__ = ['ReconConfig', 'ReconResult', 'reconstruct', 'cache_loss']


@dataclass
class ReconConfig:
    """Settings of one unit's reconstruction (the paper's defaults)."""
    iters: int = 20000
    batch_size: int = 32
    lam: float = 0.01           # weight of the rounding regulariser
    warmup: float = 0.2         # fraction of iterations without the regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    lr: Optional[float] = None  # Adam on V; None: :attr:`v_lr`
    act_lr: float = 4e-3        # Adam on the activation steps, relative to each step's initial size (cosine
                                # decay); 0: steps stay fixed
    drop_prob: float = 0.0      # QDrop
    early_stop: bool = True     # stop once every rounding is decided and stays put for 1000 iterations
    seed: int = 0

    def __post_init__(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f'reconstruction needs iters >= 1 and batch_size >= 1, got {self.iters}, {self.batch_size}')
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f'drop_prob must be in [0, 1), got {self.drop_prob}')
        if self.lam < 0 or self.act_lr < 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError('lam and act_lr must be >= 0 and lr > 0')

    @property
    def v_lr(self) -> float:
        """Adam's rate on the rounding variables: ``lr`` if given, else the paper's 1e-3 at its 20000
        iterations scaled by ``20000 / iters`` (at most 0.05). Adam moves ``V`` by about its rate per
        iteration, and a rounding is only decided once ``h(V)`` reaches 0 or 1 (``|V|`` > 2.4 from a start
        in (-2.4, 2.4)): at 1e-3, 500 iterations leave most ``h`` undecided, and the hard rounding at the end
        falls far from the soft optimum (measured on VGG-11-BN's second conv at W2, hard loss after 500
        iterations: 4.85 at 1e-3, 1.24 at 1e-2, 0.85 at 3e-2; round-to-nearest 17.3)."""
        if self.lr is not None:
            return self.lr
        return min(0.05, 1e-3 * 20000 / self.iters)


@dataclass
class ReconResult:
    """Loss of the unit on its whole cache with round-to-nearest (same grids) and after, and the
    iterations run (fewer than asked when the early stop ended them)."""
    loss_rtn: float
    loss: float
    iters: int
    seconds: float


class _AdaRoundQuant(nn.Module):
    """Stands in for a layer's weight quantizer: returns the AdaRound weight."""

    def __init__(self, ada: AdaRoundWeight):
        super().__init__()
        self.ada = ada

    def forward(self, w):
        return self.ada()


class _LearnedStepQuant(nn.Module):
    """Stands in for an input quantizer: fake quantization with a learnable step (LSQ gradient)
    and, while ``drop`` is on, QDrop's random float elements."""

    def __init__(self, quantizer, drop_prob: float, gen: torch.Generator):
        super().__init__()
        self.q = [quantizer]                               # not a submodule: its buffers stay its own
        self.step = nn.Parameter(quantizer.scale.detach().clone())
        self.drop_prob, self.drop, self.gen = drop_prob, False, gen

    def forward(self, x):
        q = self.q[0]
        if not q.enabled or not bool(q.calibrated):
            return x
        qmin, qmax = q.qrange()
        g = 1.0 / math.sqrt(max(1, x[0].numel()) * max(1, qmax))
        y = fake_quantize(x, grad_scale(self.step, g), q.zero_point, qmin, qmax, q.scheme.ch_axis)
        if self.drop and self.drop_prob > 0:
            keep = torch.rand(x.shape, generator=self.gen, device=x.device) < self.drop_prob
            y = torch.where(keep, x, y)
        return y


def _unit_loss(out: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Squared error summed over channels (axis 1), averaged over samples and positions (the
    scale the paper's ``lam`` = 0.01 was chosen for)."""
    err = (out - target) ** 2
    if weight is not None:
        err = err * weight
    return err.sum(1).mean()


@torch.no_grad()
def cache_loss(unit: nn.Module, streams: Sequence[Stream], chunk: int = 256) -> float:
    """The unit's loss over its whole cache (Fisher-weighted when the streams carry it), in chunks."""
    total, n = 0.0, 0
    for s in streams:
        for i in range(0, len(s), chunk):
            w = s.extra.get('fisher')
            out = unit(s.inputs[i:i + chunk])
            total += float(_unit_loss(out, s.outputs[i:i + chunk], None if w is None else w[i:i + chunk])) \
                * min(chunk, len(s) - i)
            n += min(chunk, len(s) - i)
    return total / max(n, 1)


def reconstruct(unit: nn.Module, layers: List[Tuple[str, nn.Module]], streams: Sequence[Stream],
                cfg: ReconConfig, progress: Optional[Callable[[int, int, float], None]] = None) -> ReconResult:
    """Learn the rounding of ``layers`` (the quantized layers inside ``unit``, weight quantizers
    calibrated) and the steps of their input quantizers so that ``unit`` reproduces the streams'
    outputs from their inputs. ``progress(t, iters, loss)`` is called every 100 iterations."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    saved = []
    adas, steps = [], []
    was_training = unit.training
    unit.eval()
    # only the rounding variables and the steps learn: no gradients for the unit's own parameters
    grad_state = [(p, p.requires_grad) for p in unit.parameters()]
    for p, _ in grad_state:
        p.requires_grad_(False)
    try:
        for _, layer in layers:
            wq, aq = layer.weight_quantizer, layer.input_quantizer
            qmin, qmax = wq.qrange()
            ada = AdaRoundWeight(layer.weight, wq.scale, wq.zero_point, qmin, qmax, wq.scheme.ch_axis)
            saved.append((layer, wq, aq))
            if hasattr(layer, 'gemm_small_maps'):           # matrix-product convolutions on small maps, for the loop
                layer.gemm_small_maps = True
            layer.weight_quantizer = _AdaRoundQuant(ada)
            adas.append(ada)
            if aq is not None and cfg.act_lr > 0:
                lsq = _LearnedStepQuant(aq, cfg.drop_prob, gen)
                layer.input_quantizer = lsq
                steps.append(lsq)
        start = ([a.v.detach().clone() for a in adas], [st.step.detach().clone() for st in steps])
        for a in adas:                                      # round-to-nearest: V >= 0 where frac >= 1/2
            a.harden()
        loss_rtn = cache_loss(unit, streams)
        for a in adas:
            a.hard = False
        opt = _adam([a.v for a in adas], cfg.v_lr)
        opt_a = sched_a = None
        if steps:
            # each step's rate relative to its size: Adam moves a parameter by about its lr per
            # iteration whatever the parameter's scale
            opt_a = _adam([dict(params=[s.step], lr=cfg.act_lr * float(s.step.detach().abs().mean()))
                           for s in steps], cfg.act_lr)
            sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0)
        beta_at = BetaSchedule(cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
        sizes = torch.tensor([len(s) for s in streams], dtype=torch.float)
        for s in steps:
            s.drop = True
        running = None
        done = cfg.iters
        marks = []                                          # rounding patterns every 100 iterations
        for t in range(cfg.iters):
            s = streams[int(torch.multinomial(sizes, 1, generator=gen))]
            idx = torch.randint(len(s), (min(cfg.batch_size, len(s)),), generator=gen)
            w = s.extra.get('fisher')
            x = s.inputs[idx]
            xf = s.extra.get('float_inputs')
            if cfg.drop_prob > 0 and xf is not None:
                x = torch.where(torch.rand(x.shape, generator=gen) < cfg.drop_prob, xf[idx], x)
            beta = beta_at(t)
            regularize = beta is not None and cfg.lam > 0
            for a in adas:                                  # the soft weights bring their regulariser
                a.beta, a.reg = (beta if regularize else None), None
            rec = _unit_loss(unit(x), s.outputs[idx], None if w is None else w[idx])
            loss = rec
            if regularize:
                loss = rec + cfg.lam * sum(a.reg if a.reg is not None else a.regularizer(beta) for a in adas)
            opt.zero_grad(set_to_none=True)
            if opt_a is not None:
                opt_a.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if opt_a is not None:
                opt_a.step()
                sched_a.step()
                with torch.no_grad():
                    for st in steps:
                        st.step.clamp_(min=1e-8)
            r = float(rec.detach())
            running = r if running is None else 0.98 * running + 0.02 * r
            if progress is not None and ((t + 1) % 100 == 0 or t + 1 == cfg.iters):
                progress(t + 1, cfg.iters, running)
            if cfg.early_stop and beta is not None and (t + 1) % 100 == 0:
                if _settled(adas, marks):
                    done = t + 1
                    break
        for s in steps:
            s.drop = False
        for a in adas:
            a.beta = a.reg = None
            a.harden()
        loss = cache_loss(unit, streams)
        if loss > loss_rtn:                                 # keep round-to-nearest where it is better
            with torch.no_grad():
                for a, v in zip(adas, start[0]):
                    a.v.copy_(v)
                for st, step in zip(steps, start[1]):
                    st.step.copy_(step)
            loss = loss_rtn
        with torch.no_grad():
            for (layer, wq, aq), ada in zip(saved, adas):
                layer.weight.data.copy_(ada().to(layer.weight.dtype))
        for st in steps:
            with torch.no_grad():
                st.q[0].scale.copy_(st.step.detach())
    finally:
        for p, flag in grad_state:
            p.requires_grad_(flag)
        for layer, wq, aq in saved:
            layer.weight_quantizer = wq
            layer.input_quantizer = aq
            if 'gemm_small_maps' in vars(layer):
                del layer.gemm_small_maps
        unit.train(was_training)
    return ReconResult(loss_rtn, loss, done, time.perf_counter() - t0)


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass per tensor instead of a dozen; CPU float32 since
    torch 2.4), or the default implementation where this torch or these tensors lack it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _settled(adas, marks, window: int = 10) -> bool:
    """Every rounding decided (``h`` within 0.01 of 0 or 1) and none of them flipped over the
    last ``window`` hundred iterations: the hard rounding, which is the result, has stopped
    changing (the rest of the schedule only lowers ``beta``, which pushes every ``h`` further
    to its end). ``marks`` collects one rounding pattern per call (the last ``window + 1``)."""
    with torch.no_grad():
        h = torch.cat([a.rounding().reshape(-1) for a in adas])
        marks.append(h >= 0.5)
        if len(marks) > window + 1:
            marks.pop(0)
        decided = bool(((h < 0.01) | (h > 0.99)).all())
    return decided and len(marks) == window + 1 and all(torch.equal(marks[0], m) for m in marks[1:])
