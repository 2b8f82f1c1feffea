"""The linear algebra of BitSplit (Wang et al., ICML 2020), torch only.

Conventions. A layer's weight is a stack of matrices ``w`` of shape ``[g, C, D]``: ``g`` groups
(1 for a plain conv / linear, ``C_out`` for a depthwise conv), ``C`` output channels per group and
``D`` inputs per output (``C_in / g * kh * kw`` for a conv). The calibration inputs of a group
are the columns of ``x`` ``[g, D, N]`` (im2col patches, or the rows of a linear layer's input).

The integers are symmetric, narrow range: ``v`` in ``[-(2^(M-1)-1), 2^(M-1)-1]``, written as
``M-1`` ternary bit planes ``v = sum_m 2^(m-1) q_m`` with ``q_m`` in ``{-1, 0, 1}``. A plane stack
``planes`` has shape ``[M-1, g, C, D]`` (plane ``m`` of the paper at index ``m-1``). The weight
is approximated by ``alpha * v`` with ``alpha`` of shape ``[g, C, 1]``: one value per output
channel, or the same value everywhere for a per-layer scale.

The response objective of one output channel (row ``w_c``, target output ``y_c``) is
``f_c = ||y_c - alpha_c x^T v_c||^2``. It is evaluated through the Gram matrix ``G = x x^T``
in residual form, ``f_c = ||e_c||^2 - 2 r_c . d_c + r_c^T G r_c`` with ``r_c = alpha_c v_c - w_c``,
``e_c = y_c - x^T w_c`` and ``d_c = x e_c``; ``e`` and ``d`` vanish when the target is the
layer's own float output on the same inputs. The residual form keeps float32 accurate when the
error is small compared with the output.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

try:   # the compiled inner loop of the coordinate sweep (setup.py builds it; same result, faster)
    from . import _bitsplit_sweep as _sweep_ext
except ImportError:                                    # pragma: no cover - depends on the install
    _sweep_ext = None

_TINY = 1e-12


def qmax_of(bits: int) -> int:
    """Largest integer of the symmetric narrow ``bits``-bit grid."""
    return 2 ** (bits - 1) - 1


# --------------------------------------------------------------------------- bit planes
def split_planes(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``v`` (any shape, values in the narrow ``bits``-bit range) -> ``[bits-1, *v.shape]``
    ternary planes: the sign of ``v`` times the binary digits of ``|v|``.

    >>> split_planes(torch.tensor([-3., 0., 2.]), 3)
    tensor([[-1.,  0.,  0.],
            [-1.,  0.,  1.]])
    """
    q = qmax_of(bits)
    vi = v.round().to(torch.int64)
    if bool((vi.abs() > q).any()):
        raise ValueError(f'integers outside the {bits}-bit narrow range [-{q}, {q}]')
    mag, sign = vi.abs(), vi.sign()
    planes = [((mag >> m) & 1) * sign for m in range(bits - 1)]
    return torch.stack(planes).to(v.dtype if v.is_floating_point() else torch.float32)


def plane_weights(n_planes: int, like: torch.Tensor) -> torch.Tensor:
    """``[2^0, 2^1, ...]`` shaped to broadcast against a plane stack."""
    w = torch.tensor([2.0 ** m for m in range(n_planes)], dtype=like.dtype, device=like.device)
    return w.reshape([-1] + [1] * (like.dim() - 1))


def stitch_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_planes` (and the integer of any plane stack): ``sum 2^(m-1) q_m``."""
    return (planes * plane_weights(planes.shape[0], planes)).sum(0)


# --------------------------------------------------------------------------- scales
def rtn_init(w: torch.Tensor, bits: int, per_channel: bool = True):
    """Round-to-nearest start: ``alpha = max|w| / qmax`` (per channel or per layer) and
    ``v = clip(round(w / alpha))``. Returns ``(alpha [g, C, 1], v [g, C, D])``."""
    q = qmax_of(bits)
    amax = w.abs().amax(-1, keepdim=True)
    if not per_channel:
        amax = amax.amax((0, 1), keepdim=True).expand_as(amax)
    alpha = torch.clamp(amax / q, min=_TINY)
    v = torch.clamp(torch.round(w / alpha), -q, q)
    return alpha.clone(), v


def closed_form_alpha(v: torch.Tensor, b: torch.Tensor, vg: Optional[torch.Tensor] = None,
                      per_channel: bool = True, fallback: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``alpha`` minimising ``sum_c ||y_c - alpha_c x^T v_c||^2`` for fixed integers ``v``.

    ``b = x y^T`` rows (``[g, C, D]``; the weights ``w`` themselves for the weight-only fit, where
    ``x`` is the identity) and ``vg = v G`` (``None``: ``G`` is the identity). Per channel
    ``alpha_c = v_c . b_c / v_c^T G v_c``; per layer the numerators and denominators are summed
    over all channels. Where the denominator vanishes (all-zero integers) ``fallback`` is kept.
    """
    vg = v if vg is None else vg
    num = (v * b).sum(-1, keepdim=True)
    den = (v * vg).sum(-1, keepdim=True)
    if not per_channel:
        num = num.sum((0, 1), keepdim=True).expand_as(num)
        den = den.sum((0, 1), keepdim=True).expand_as(den)
    fb = torch.ones_like(num) if fallback is None else fallback.expand_as(num)
    ok = den > _TINY * den.amax()          # relative: the scale of G is arbitrary
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fb)


def make_positive(alpha: torch.Tensor, planes: torch.Tensor):
    """``alpha * v`` is unchanged by flipping both signs: return ``(|alpha|, planes)`` with the
    planes of channels whose alpha was negative negated (in place)."""
    neg = alpha < 0
    if bool(neg.any()):
        planes.mul_(torch.where(neg, -1.0, 1.0).to(planes.dtype))
        alpha = alpha.abs()
    return torch.clamp(alpha, min=_TINY), planes


# --------------------------------------------------------------------------- stage 1: weights only
def weight_error(w: torch.Tensor, alpha: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``||w_c - alpha_c v_c||^2`` per channel, ``[g, C]``."""
    return ((w - alpha * v) ** 2).sum(-1)


def round_to_grid(w: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """The exact minimiser of ``||w - alpha v||^2`` over all bit planes jointly for fixed ``alpha``:
    the M-1 ternary planes span every integer in ``[-qmax, qmax]``, so it is elementwise
    ``clip(round(w / alpha))`` (a plane-by-plane sweep can stop short of it)."""
    q = qmax_of(bits)
    return torch.clamp(torch.round(w / alpha), -q, q)


def fit_weight_only(w: torch.Tensor, bits: int, per_channel: bool = True, iters: int = 50,
                    alpha: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None):
    """Stage 1: alternate the closed-form alpha and the exact integers for it
    (:func:`round_to_grid`) on ``||w - alpha v||^2`` until the integers stop changing, from
    round-to-nearest unless ``alpha`` / ``v`` are given. Returns ``(alpha, v)``; the weight error
    never exceeds that of the start."""
    if alpha is None or v is None:
        alpha, v = rtn_init(w, bits, per_channel)
    best_a, best_v = alpha.clone(), v.clone()
    best_f = weight_error(w, alpha, v)
    for _ in range(iters):
        alpha = torch.clamp(closed_form_alpha(v, w, None, per_channel, fallback=alpha).abs(), min=_TINY)
        v_new = round_to_grid(w, alpha, bits)
        f = weight_error(w, alpha, v_new)
        best_a, best_v, best_f, improved = _keep_best(best_a, best_v, best_f, alpha, v_new, f, per_channel)
        done = torch.equal(v_new, v)
        v = v_new
        if done or not improved:
            break
    return best_a, best_v


def _keep_best(best_a, best_v, best_f, alpha, v, f, per_channel: bool):
    """Per-channel (independent problems) or whole-layer selection of the lower objective."""
    if per_channel:
        better = f < best_f
        improved = bool(better.any())
        best_a = torch.where(better.unsqueeze(-1), alpha, best_a)
        best_v = torch.where(better.unsqueeze(-1), v, best_v)
        best_f = torch.where(better, f, best_f)
    else:
        improved = bool(f.sum() < best_f.sum())
        if improved:
            best_a, best_v, best_f = alpha.clone(), v.clone(), f
    return best_a, best_v, best_f, improved


# --------------------------------------------------------------------------- stage 2: responses
@dataclass
class ResponseProblem:
    """Everything the response objective needs, with ``x`` reduced to its Gram matrix.

    ``gram [g, D, D]``, ``w [g, C, D]``, ``wg = w G``, ``b = w G + d`` (``= x y^T`` rows), ``d [g, C, D]`` or
    ``None``, ``ee [g, C]`` (``||y - x^T w||^2``; zeros when ``d`` is None), ``yy [g, C]``
    (``||y||^2``, for relative errors)."""
    gram: torch.Tensor
    w: torch.Tensor
    wg: torch.Tensor
    b: torch.Tensor
    d: Optional[torch.Tensor]
    ee: torch.Tensor
    yy: torch.Tensor


def as_groups(w: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None):
    """Accept ``w [C, D]`` / ``x [D, N]`` / ``y [C, N]`` as one group."""
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if y is not None and y.dim() == 2:
        y = y.unsqueeze(0)
    return w, x, y


def response_problem(w: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> ResponseProblem:
    """Build the problem for weights ``w [g, C, D]`` on inputs ``x [g, D, N]``; the target is
    ``y [g, C, N]`` if given (e.g. the float network's output while ``x`` comes from the quantized
    network), else ``w x`` itself."""
    w, x, y = as_groups(w, x, y)
    gram = torch.bmm(x, x.transpose(1, 2))
    wg = torch.bmm(w, gram)
    if y is None:
        d = None
        ee = torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
        yy = (w * wg).sum(-1).clamp(min=0)
        b = wg
    else:
        e = y - torch.bmm(w, x)
        d = torch.bmm(e, x.transpose(1, 2))
        ee = (e ** 2).sum(-1)
        yy = (y ** 2).sum(-1)
        b = wg + d
    return ResponseProblem(gram, w, wg, b, d, ee, yy)


def objective(prob: ResponseProblem, alpha: torch.Tensor, v: torch.Tensor, return_rg: bool = False,
              rg: Optional[torch.Tensor] = None):
    """Per-channel ``||y_c - alpha_c x^T v_c||^2`` (``[g, C]``), and optionally ``r G`` (pass ``rg``
    when it is known, e.g. from the sweeps' :func:`gradient_terms`)."""
    r = alpha * v - prob.w
    if rg is None:
        rg = torch.bmm(r, prob.gram)
    f = prob.ee + (r * rg).sum(-1)
    if prob.d is not None:
        f = f - 2 * (r * prob.d).sum(-1)
    f = f.clamp(min=0)
    return (f, rg) if return_rg else f


def gradient_terms(prob: ResponseProblem, alpha: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """``h = G r^T - d^T`` (``[g, D, C]``) for the residual ``r = alpha v - w`` of the planes: row ``i``
    holds, for every output channel, the linear term of the objective in input ``i``."""
    r = alpha * stitch_planes(planes) - prob.w
    h = torch.bmm(prob.gram, r.transpose(1, 2))
    if prob.d is not None:
        h -= prob.d.transpose(1, 2)
    return h


def update_plane_response(prob: ResponseProblem, alpha: torch.Tensor, planes: torch.Tensor, m: int,
                          block_size: int = 128, h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One coordinate-descent sweep over the input columns of plane ``m`` (0-based), in place.

    With everything else fixed, the objective as a function of ``q_{c,i}`` (plane ``m``, output
    channel ``c``, input ``i``) is the convex quadratic
    ``2 alpha t ((G r_c)_i - d_{c,i}) + alpha^2 t^2 G_ii`` of the step ``t = 2^m (q - q_old)``;
    its minimum over ``{-1, 0, 1}`` is its real minimiser rounded and clipped. Each column is
    solved for all channels of all groups at once (over ``[g, C]``), the columns one after
    another in blocks of ``block_size`` (:func:`sweep_block`: inside a block the later columns
    see each change). The linear terms ``h`` (:func:`gradient_terms`) are kept current: after a
    block, the columns that changed update all rows by one product ``G[:, changed] dr[changed]``,
    so once the fit settles and few values move, a sweep costs little more than its loop.
    Pass ``h`` to reuse (and update in place) the terms of the current planes across sweeps.
    The objective never increases (up to rounding).
    """
    gram = prob.gram
    if h is None:
        h = gradient_terms(prob, alpha, planes)
    step = alpha * 2.0 ** m                                       # [g, C, 1]: change of r per unit q
    diag = torch.diagonal(gram, dim1=1, dim2=2).unsqueeze(1)      # [g, 1, D]
    live = diag > _TINY * diag.abs().amax().clamp(min=_TINY)
    inv = torch.where(live, 1.0 / (step * torch.where(live, diag, torch.ones_like(diag))),
                      torch.zeros((), dtype=diag.dtype, device=diag.device))   # [g, C, D]
    step_t = step.transpose(1, 2).contiguous()                    # [g, 1, C]
    D = gram.shape[-1]
    for j0 in range(0, D, block_size):
        j1 = min(j0 + block_size, D)
        # block columns laid out [g, B, C] so that one input column is one contiguous slice
        hb = h[:, j0:j1].clone()
        old = planes[m, :, :, j0:j1].transpose(1, 2).contiguous()
        pb = old.clone()
        ib = inv[:, :, j0:j1].transpose(1, 2).contiguous()
        sweep_block(hb, pb, ib, gram[:, j0:j1, j0:j1], step_t)
        dq = pb - old
        changed = dq.ne(0).any(2).any(0).nonzero().flatten()     # block columns with a new value
        if changed.numel():
            planes[m, :, :, j0:j1] = pb.transpose(1, 2)
            h.baddbmm_(gram[:, :, j0 + changed], dq[:, changed] * step_t)
    return planes


def sweep_block(hb: torch.Tensor, pb: torch.Tensor, ib: torch.Tensor, gb: torch.Tensor,
                step_t: torch.Tensor, compiled: Optional[bool] = None) -> None:
    """Solve the columns of one block in order, in place: ``pb [g, B, C]`` the plane's values,
    ``hb [g, B, C]`` their gradient terms, ``ib [g, B, C]`` ``1 / (step G_ii)``, ``gb [g, B, B]``
    the block of the Gram matrix, ``step_t [g, 1, C]`` ``alpha 2^m``. Column ``k`` becomes
    ``clip(round(q - h inv), -1, 1)`` and the later columns' ``h`` take its change.

    ``compiled=None`` uses the C++ loop (mmquant/ptq/csrc) when it is built and the tensors are on
    the CPU, else this Python loop, which is its reference (one tensor op per column: on small
    layers its time is the per-op overhead, hence the C++ version)."""
    if compiled is None:
        compiled = _sweep_ext is not None and hb.device.type == 'cpu'
    if compiled:
        if _sweep_ext is None:
            raise RuntimeError('the compiled BitSplit sweep is not built; '
                               'run `pip install --no-build-isolation -e .` in the mmquant checkout')
        _sweep_ext.sweep_block(hb, pb, ib, gb.contiguous(), step_t.reshape(step_t.shape[0], -1).contiguous())
        return
    hbs, pbs, ibs = hb.unbind(1), pb.unbind(1), ib.unbind(1)
    n = hb.shape[1]
    for k in range(n):
        q = pbs[k]
        dq = torch.addcmul(q, hbs[k], ibs[k], value=-1).round_().clamp_(-1, 1).sub_(q)
        # the columns still to visit in this block see the change (most columns keep their
        # value once the fit settles: skipping them halves the work of the later rounds)
        if bool(dq.any()):
            q.add_(dq)
            if k + 1 < n:
                hb[:, k + 1:].baddbmm_(gb[:, k + 1:, k:k + 1], dq.unsqueeze(1).mul_(step_t))


@dataclass
class FitResult:
    """``alpha [g, C, 1]`` and integers ``ints [g, C, D]`` (weight ``~ alpha * ints``), the
    relative output errors ``||Y - Y_hat|| / ||Y||`` on the samples of round-to-nearest (same
    initial alpha) and of the result, and the total objective after each stage-2 iteration."""
    alpha: torch.Tensor
    ints: torch.Tensor
    err_rtn: float
    err_bitsplit: float
    history: List[float] = field(default_factory=list)

    @property
    def weight(self) -> torch.Tensor:
        return self.alpha * self.ints


def _rel(f: torch.Tensor, yy: torch.Tensor) -> float:
    return math.sqrt(float(f.sum()) / max(float(yy.sum()), _TINY))


def fit_layer(w: torch.Tensor, x: torch.Tensor, bits: int, per_channel: bool = True, iters: int = 4,
              y: Optional[torch.Tensor] = None, weight_iters: int = 50, block_size: int = 128,
              tol: float = 1e-4, holdout: float = 0.0) -> FitResult:
    """BitSplit for one layer: ``w [g, C, D]`` (or ``[C, D]``), inputs ``x [g, D, N]`` (or
    ``[D, N]``), target ``y`` (default ``w x``).

    1. round-to-nearest start (``alpha = max|w| / qmax``);
    2. stage 1, weight-only alternation (:func:`fit_weight_only`);
    3. stage 2 from the stage-1 state, keeping the best state seen (round-to-nearest included):
       ``iters`` rounds of closed-form alpha, then one coordinate-descent sweep per bit plane from
       the most significant, then stitching; the rounds stop
       early once the objective improves by less than ``tol`` (relative).

    ``holdout`` > 0: that fraction of the samples (a seeded random choice) is not fitted on but
    decides which state is kept (per channel for per-channel scales), and the returned errors
    are measured on it. With fewer samples than inputs per output (``N < D``) the fit can lower
    the error on its own samples and raise it elsewhere; the held-out samples catch that, and
    round-to-nearest is kept where it generalises better.
    """
    w, x, y = as_groups(w, x, y)
    val = None
    if holdout > 0:
        n = x.shape[-1]
        k = min(n - 1, max(1, round(n * holdout)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(x.device)
        vi, ti = perm[:k], perm[k:]
        val = response_problem(w, x[..., vi], None if y is None else y[..., vi])
        x, y = x[..., ti], (None if y is None else y[..., ti])
    prob = response_problem(w, x, y)

    def select(a, v, f):        # the objective that decides which state is kept
        return f if val is None else objective(val, a, v)

    a0, v0 = rtn_init(w, bits, per_channel)
    f_rtn = objective(prob, a0, v0)
    s_rtn = select(a0, v0, f_rtn)
    a1, v1 = fit_weight_only(w, bits, per_channel, weight_iters, a0, v0)
    f1, rg1 = objective(prob, a1, v1, return_rg=True)
    best_a, best_v, best_s, _ = _keep_best(a0, v0, s_rtn, a1, v1, select(a1, v1, f1), per_channel)
    # the rounds start from stage 1 even where round-to-nearest has the lower response error:
    # its better weight fit leads to better optima (the best state seen is what is returned)
    alpha, v, rg = a1.clone(), v1.clone(), rg1
    planes = split_planes(v, bits)
    history = [float(_keep_best(a0, v0, f_rtn, a1, v1, f1, per_channel)[2].sum())]
    prev = history[0]
    for _ in range(iters):
        vg = (rg + prob.wg) / alpha
        alpha = closed_form_alpha(v, prob.b, vg, per_channel, fallback=alpha)
        alpha, planes = make_positive(alpha, planes)
        h = gradient_terms(prob, alpha, planes)          # one D x D product per round
        for m in reversed(range(planes.shape[0])):
            update_plane_response(prob, alpha, planes, m, block_size, h=h)
        v = stitch_planes(planes)
        rg = h.transpose(1, 2) if prob.d is None else h.transpose(1, 2) + prob.d   # r G, kept current
        f = objective(prob, alpha, v, rg=rg)
        best_a, best_v, best_s, _ = _keep_best(best_a, best_v, best_s, alpha, v, select(alpha, v, f), per_channel)
        cur = float(f.sum())
        history.append(cur)
        if prev - cur <= tol * prev:
            break
        prev = cur
    yy = prob.yy if val is None else val.yy
    return FitResult(best_a, best_v, _rel(s_rtn, yy), _rel(best_s, yy), history)


# --------------------------------------------------------------------------- activations
def als_activation_scale(values: torch.Tensor, bits: int, signed: Optional[bool] = None, iters: int = 10,
                         max_abs: Optional[float] = None, narrow_range: bool = False):
    """Per-tensor scale of a symmetric (zero point 0) activation grid by alternating least squares
    on sample ``values``: ``q = clip(round(x / alpha))`` then ``alpha = x.q / q.q``, from the
    max-based scale (``max_abs``, default the sample's). ``signed=None``: unsigned when the sample
    has no negative value. Returns ``(scale, signed)``; the mean squared error never exceeds that of
    the max-based start.

    >>> s, signed = als_activation_scale(torch.tensor([0., 0.5, 1., 1., 8.]), 3)
    >>> signed, round(s, 4), round(8 / 7, 4)   # unsigned 3-bit grid; ALS scale vs the max-based one
    (False, 1.1373, 1.1429)
    """
    x = values.detach().reshape(-1).double()
    if signed is None:
        signed = bool(x.numel() and x.min() < 0)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow_range else -qmax - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    top = float(x.abs().max()) if max_abs is None else float(max_abs)
    if not signed:
        top = float(x.clamp(min=0).max()) if max_abs is None else top
    alpha = max(top / qmax, _TINY)

    def mse(a):
        return float(((x - torch.clamp(torch.round(x / a), qmin, qmax) * a) ** 2).mean()) if x.numel() else 0.0

    best_a, best_e = alpha, mse(alpha)
    for _ in range(iters):
        q = torch.clamp(torch.round(x / alpha), qmin, qmax)
        qq = float((q * q).sum())
        if qq <= 0:
            break
        new = float((x * q).sum()) / qq
        if new <= _TINY:
            break
        e = mse(new)
        if e < best_e:
            best_a, best_e = new, e
        if abs(new - alpha) <= 1e-7 * alpha:
            break
        alpha = new
    return best_a, signed
