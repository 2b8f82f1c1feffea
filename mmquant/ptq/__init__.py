"""Post-training quantization methods, registered by name (torch only)."""
import inspect

from .base import PTQ_METHODS, PTQMethod, check_method, register_ptq
from .bitsplit import BitSplitPTQ
from .brecq import BRECQPTQ
from .f8net import F8NetPTQ
from .lapq import LAPQPTQ
from .observer_ptq import ACIQPTQ, KLPTQ, MSEPTQ, MinMaxPTQ, PercentilePTQ


def build_ptq(name: str, qconfig=None, bits=None, **options) -> PTQMethod:
    """The PTQ method ``name`` with its qconfig and method ``options`` (e.g. bitsplit's
    ``num_samples``); one clear error for an unknown name or option."""
    cls = PTQ_METHODS[check_method(name)]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ('self', 'qconfig', 'bits')]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f'unknown options {unknown} for method {name!r}; accepted: '
                         f'{", ".join(accepted) if accepted else "none"}')
    return cls(qconfig, bits, **options)


__all__ = ['PTQ_METHODS', 'PTQMethod', 'register_ptq', 'build_ptq', 'check_method',
           'MinMaxPTQ', 'PercentilePTQ', 'MSEPTQ', 'KLPTQ', 'ACIQPTQ', 'BitSplitPTQ', 'BRECQPTQ', 'F8NetPTQ', 'LAPQPTQ']
