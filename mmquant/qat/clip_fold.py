"""F8Net: PACT's clipping level folded into the layer that produces the clipped input (torch only).

A layer with PACT as fixed point reads ``Q(x / eta)``, ``eta = 2^FL alpha / qmax``. The paper
absorbs the ``1 / eta`` into the layer that produced ``x``: up to a power of two it is
``qmax / alpha``, so the producer's (BatchNorm-folded) weights are quantized in units of
``alpha / qmax`` (:meth:`~mmquant.quantizers.FixedPointQuantizer.fold_unit`), and an integer
network then rescales between the two layers by shifts only.

Which layer produces what a layer reads is found on the autograd graph of one forward pass
(:func:`first_readers`): walking back from each quantized layer's input, the first outputs of
quantized layers met are its producers, through whatever lies between (BatchNorm, ReLU, pooling,
residual adds, reshapes). A producer is folded with the one clipping level all its first readers
share (:func:`fold_clip_units` ties them first): a residual stream's readers already share one
once :func:`~mmquant.nn.share_residual_clipping` tied them; the fold adds the layers that read
the stream outside the chain of blocks (the classifier after the last one). A producer with a
reader without PACT is left as it was and named in the result.
"""
from typing import Callable, Dict, List, Tuple

from torch import nn

from ..calibrate import disabled
from ..convert import all_quantizers, upstream_layers
from ..nn import QUANT_LAYERS


def first_readers(model: nn.Module, example_forward: Callable[[], object]) -> Dict[str, List[str]]:
    """For every quantized layer of ``model``, the quantized layers that read its output before any
    other quantized layer does (:func:`~mmquant.convert.upstream_layers`, quantizers off)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    with disabled(all_quantizers(model)):
        upstream = upstream_layers(model, names, example_forward)
    readers = {n: [] for n in names}
    for reader, producers in upstream.items():
        for producer in producers:
            readers[producer].append(reader)
    return readers


def _tie(quantizers, every_pact):
    """One clipping level for ``quantizers``: the first one's owner becomes the owner of the others
    and of every quantizer that shared theirs (``every_pact``: all PACT quantizers of the model)."""
    root = quantizers[0].clip_owner()
    for q in quantizers[1:]:
        owner = q.clip_owner()
        if owner is root:
            continue
        followers = [o for o in every_pact if o is not owner and o.clip_owner() is owner]
        for other in followers + [owner]:         # the owner last: it drops its alpha
            other.share_clip(root)


def fold_clip_units(model: nn.Module, example_forward: Callable[[], object]
                    ) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Fold into each fixed-point producer the clipping level of its first readers (module doc),
    tying the readers of one producer to one clipping level first: F8Net's sharing along a
    residual stream, extended to every layer that reads the stream (the classifier reading the
    last one, the convs reading it through identity shortcuts). Returns ``(folded, left)``:
    ``(producer, reader)`` pairs, and the producers left unfolded because a reader has no PACT."""
    modules = dict(model.named_modules())
    every_pact = [m for m in model.modules() if getattr(m, 'clip', None) == 'pact']
    folds, left = [], []
    for producer, readers in first_readers(model, example_forward).items():
        wq = getattr(modules[producer], 'weight_quantizer', None)
        if not readers or not hasattr(wq, 'fold_unit'):
            continue
        quantizers = [getattr(modules[r], 'input_quantizer', None) for r in readers]
        if any(getattr(q, 'clip', None) != 'pact' for q in quantizers):
            left.append(producer)
            continue
        _tie(quantizers, every_pact)
        wq.fold_unit(quantizers[0])              # its unit follows the reader's owner, also after later ties
        folds.append((producer, readers[0]))
    return folds, left


__all__ = ['first_readers', 'fold_clip_units']
