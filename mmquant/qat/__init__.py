"""Quantization-aware training methods, by name (torch only)."""
from .methods import QAT_METHODS, QATMethod, check_qat_method, prepare_qat, qat_qconfig

__all__ = ['QAT_METHODS', 'QATMethod', 'check_qat_method', 'qat_qconfig', 'prepare_qat']
