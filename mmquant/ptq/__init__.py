"""Post-training quantization methods, registered by name (torch only)."""
from .base import PTQ_METHODS, PTQMethod, check_method, register_ptq
from .observer_ptq import KLPTQ, MSEPTQ, MinMaxPTQ, PercentilePTQ


def build_ptq(name: str, qconfig=None, bits=None) -> PTQMethod:
    """The PTQ method ``name`` with its qconfig; one clear error for an unknown name."""
    return PTQ_METHODS[check_method(name)](qconfig, bits)


__all__ = ['PTQ_METHODS', 'PTQMethod', 'register_ptq', 'build_ptq', 'check_method',
           'MinMaxPTQ', 'PercentilePTQ', 'MSEPTQ', 'KLPTQ']
