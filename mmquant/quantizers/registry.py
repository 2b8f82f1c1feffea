"""The quantizers a ``LayerQConfig`` can name (``w_quantizer`` / ``a_quantizer``), by name."""
from typing import Dict, Tuple

from .binary import BiRealWeightQuantizer, SignActQuantizer, XNORPPWeightQuantizer, XNORWeightQuantizer
from .dorefa import DoReFaActQuantizer, DoReFaWeightQuantizer
from .fixed_point import FixedPointQuantizer
from .lqnet import LQNetQuantizer
from .lsq import LSQQuantizer
from .pact import PACTQuantizer
from .sat import CGPACTQuantizer, SATWeightQuantizer
from .scheme import MAX_BITS, MIN_BITS

# name -> (weight quantizer class or None, activation quantizer class or None)
QUANTIZERS: Dict[str, Tuple[type, type]] = {
    'lsq': (LSQQuantizer, LSQQuantizer),
    'pact': (None, PACTQuantizer),
    'sat': (SATWeightQuantizer, CGPACTQuantizer),
    'dorefa': (DoReFaWeightQuantizer, DoReFaActQuantizer),
    'lqnet': (LQNetQuantizer, LQNetQuantizer),
    'xnor': (XNORWeightQuantizer, None),
    'xnorpp': (XNORPPWeightQuantizer, None),
    'bireal': (BiRealWeightQuantizer, None),
    'sign': (None, SignActQuantizer),
    'fixed': (FixedPointQuantizer, FixedPointQuantizer),
}
NAMES = ('uniform', ) + tuple(QUANTIZERS)


def quantizer_class(name: str, kind: str):
    """The class behind ``name`` for ``kind`` ('weight' / 'act'), with one clear error."""
    if name not in NAMES:
        raise ValueError(f'unknown quantizer {name!r}; accepted: {", ".join(NAMES)}')
    if name == 'uniform':
        return None
    cls = QUANTIZERS[name][0 if kind == 'weight' else 1]
    if cls is None:
        usable = [n for n, pair in QUANTIZERS.items() if pair[0 if kind == 'weight' else 1] is not None]
        raise ValueError(f'quantizer {name!r} has no {"weight" if kind == "weight" else "activation"} form; '
                         f'accepted for {kind}: uniform, {", ".join(usable)}')
    return cls


def check_quantizer_bits(name: str, kind: str, bits: int, what: str) -> int:
    """``bits`` if quantizer ``name`` takes it for ``kind``, else one clear ValueError."""
    cls = quantizer_class(name, kind)
    lo, hi = (MIN_BITS, MAX_BITS) if cls is None else (cls.min_bits, cls.max_bits)
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        extra = ' (1 bit: quantizers dorefa, lqnet, pact, xnor, xnorpp, bireal, sign)' if lo > 1 else ''
        raise ValueError(f'{what}={bits!r} is out of range for the {name} quantizer: accepted '
                         f'{lo}..{hi}{extra}' if lo != hi else
                         f'{what}={bits!r} is out of range for the {name} quantizer: it is {lo}-bit only')
    return bits


def build_quantizer(name: str, kind: str, bits: int, **kwargs):
    """A quantizer of ``name`` for ``kind`` (not 'uniform', which the converter builds itself)."""
    return quantizer_class(name, kind)(bits=bits, kind=kind, **kwargs)
