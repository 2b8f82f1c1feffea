"""Per-layer quantization sensitivity of a converted, calibrated model, torch only.

Two views per quantized layer, both against the float network on the same batches:

- *only*: this layer quantized (its weight and its input), every other layer float: how much
  damage the layer does on its own;
- *all but*: every layer quantized except this one: how much is recovered by keeping it float.

Each view gives the output SQNR (dB; the model's outputs flattened per sample, a detector's head
maps concatenated), the mean per-sample cosine similarity, and, with a ``metric_fn``, the task
metric (e.g. top-1). For a size budget, :func:`weight_noise` measures each layer's output noise
with only its weight at each candidate bit width (activations float), and :func:`suggest_bits`
picks the widths that minimise the summed noise within the budget (the multiple-choice knapsack
of :func:`mmquant.ptq.mixed_precision.choose_bits`; noise of several layers adds up to first order).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..calibrate import disabled
from ..convert import all_quantizers, quant_layers
from ..ptq.mixed_precision import choose_bits, set_weight_bits

__all__ = ['LayerSensitivity', 'flat_outputs', 'float_outputs', 'compare', 'layer_sensitivity', 'weight_noise',
           'suggest_bits']


@dataclass
class LayerSensitivity:
    """One layer's row: its parameter count and bits, and the two views (SQNR in dB, cosine,
    metric or ``None``); ``noise``: relative output noise power with only its weight at each
    candidate bit width (filled by :func:`weight_noise`)."""
    name: str
    params: int
    w_bits: int
    a_bits: Optional[int]
    only_sqnr: float
    only_cosine: float
    only_metric: Optional[float]
    all_but_sqnr: float
    all_but_cosine: float
    all_but_metric: Optional[float]
    noise: Dict[int, float] = field(default_factory=dict)


def _tensors(out) -> List[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def flat_outputs(out) -> torch.Tensor:
    """A model's output (a tensor, or nested tuples / lists / dicts of tensors with the batch
    first) as one ``(batch, features)`` float tensor."""
    ts = _tensors(out)
    if not ts:
        raise TypeError('sensitivity needs a forward that returns tensors (batch first)')
    n = ts[0].shape[0]
    return torch.cat([t.detach().reshape(n, -1).float() for t in ts], 1)


@torch.no_grad()
def run(model: nn.Module, batches: Sequence, forward_fn: Callable) -> List[torch.Tensor]:
    """The flattened outputs of every batch."""
    model.eval()
    return [flat_outputs(forward_fn(model, b)) for b in batches]


def float_outputs(model: nn.Module, batches: Sequence, forward_fn: Optional[Callable] = None) -> List[torch.Tensor]:
    """The flattened outputs of every batch with every quantizer off: the reference both
    :func:`layer_sensitivity` and :func:`weight_noise` compare with (pass it to both to run it once)."""
    with disabled(all_quantizers(model)):
        return run(model, batches, forward_fn or (lambda m, b: m(b)))


def compare(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]):
    """``(sqnr_db, mean cosine)`` of ``out`` against ``ref`` over all batches; SQNR is ``inf``
    where the outputs are equal."""
    sig = err = 0.0
    cos, n = 0.0, 0
    for r, o in zip(ref, out):
        sig += float((r.double() ** 2).sum())
        err += float(((r.double() - o.double()) ** 2).sum())
        cos += float(torch.nn.functional.cosine_similarity(r.double(), o.double(), dim=1, eps=1e-12).sum())
        n += r.shape[0]
    sqnr = math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err)
    return sqnr, cos / max(n, 1)


def _layer_quantizers(layer) -> list:
    return [q for q in (layer.weight_quantizer, getattr(layer, 'input_quantizer', None)) if q is not None]


def layer_sensitivity(model: nn.Module, batches: Sequence, forward_fn: Optional[Callable] = None,
                      metric_fn: Optional[Callable[[List[torch.Tensor]], float]] = None,
                      layers: Optional[Sequence[str]] = None,
                      progress: Optional[Callable[[int, int], None]] = None,
                      reference: Optional[List[torch.Tensor]] = None):
    """``(float metric or None, rows)``: one :class:`LayerSensitivity` per quantized layer of
    ``model`` (converted and calibrated; or only those named in ``layers``), in model order.
    ``metric_fn(outputs)`` gets the flattened outputs of every batch, in order; ``reference``: the
    :func:`float_outputs` of the same batches, if already computed."""
    forward_fn = forward_fn or (lambda m, b: m(b))
    named = quant_layers(model)
    if layers is not None:
        known = {n for n, _ in named}
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f'{unknown[0]!r} is not a quantized layer; quantized: {", ".join(sorted(known))}')
        named = [(n, m) for n, m in named if n in set(layers)]
    every = all_quantizers(model)
    ref = reference if reference is not None else float_outputs(model, batches, forward_fn)
    float_metric = metric_fn(ref) if metric_fn else None
    rows = []
    for k, (name, layer) in enumerate(named):
        mine = _layer_quantizers(layer)
        others = [q for q in every if all(q is not m for m in mine)]
        with disabled(others):
            only = run(model, batches, forward_fn)
        with disabled(mine):
            all_but = run(model, batches, forward_fn)
        aq = getattr(layer, 'input_quantizer', None)
        rows.append(LayerSensitivity(
            name, layer.weight.numel(), layer.weight_quantizer.bits, None if aq is None else aq.bits,
            *compare(ref, only), metric_fn(only) if metric_fn else None,
            *compare(ref, all_but), metric_fn(all_but) if metric_fn else None))
        if progress is not None:
            progress(k + 1, len(named))
    return float_metric, rows


def weight_noise(model: nn.Module, rows: Sequence[LayerSensitivity], candidates: Sequence[int],
                 batches: Sequence, forward_fn: Optional[Callable] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 reference: Optional[List[torch.Tensor]] = None) -> None:
    """Fill ``row.noise[b]`` for each row and candidate width ``b``: the output noise power
    relative to the signal (``10 ** (-SQNR / 10)``) with only that layer's weight quantized, at
    ``b`` bits on a grid fitted by its weight observer. The layer's own quantizer is put back.
    ``reference``: as for :func:`layer_sensitivity`."""
    forward_fn = forward_fn or (lambda m, b: m(b))
    layers = dict(quant_layers(model))
    every = all_quantizers(model)
    ref = reference if reference is not None else float_outputs(model, batches, forward_fn)
    for k, row in enumerate(rows):
        layer = layers[row.name]
        kept = layer.weight_quantizer
        try:
            for b in candidates:
                set_weight_bits(layer, int(b))          # a new quantizer, or ``kept`` at its own bits
                wq = layer.weight_quantizer
                with disabled([q for q in every if q is not wq]):
                    out = run(model, batches, forward_fn)
                sqnr, _ = compare(ref, out)
                row.noise[int(b)] = 0.0 if math.isinf(sqnr) else 10 ** (-sqnr / 10)
                layer.weight_quantizer = kept
        finally:
            layer.weight_quantizer = kept
        if progress is not None:
            progress(k + 1, len(rows))


def suggest_bits(rows: Sequence[LayerSensitivity], avg_bits: float,
                 fixed: Sequence[str] = ()) -> Dict[str, int]:
    """Weight bits per layer: the rows not in ``fixed`` (e.g. first and last layers, which keep
    their bits) get one of the widths measured in ``row.noise``, chosen to minimise the summed
    relative output noise while their weights average at most ``avg_bits`` bits."""
    search = [r for r in rows if r.name not in set(fixed)]
    if not search:
        raise ValueError('no layer left to choose bits for')
    widths = sorted(search[0].noise)
    if not widths or any(sorted(r.noise) != widths for r in search):
        raise ValueError('suggest_bits needs the same measured widths for every layer (run weight_noise)')
    sizes = [[r.params * b for b in widths] for r in search]
    losses = [[r.noise[b] for b in widths] for r in search]
    choice = choose_bits(sizes, losses, avg_bits * sum(r.params for r in search))
    return {r.name: widths[k] for r, k in zip(search, choice)}
