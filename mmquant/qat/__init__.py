"""Quantization-aware training methods, by name (torch only)."""
from .distill import distill_loss
from .f8net import prepare_f8net
from .methods import QAT_METHODS, QATMethod, check_qat_method, prepare_qat, qat_qconfig

__all__ = ['QAT_METHODS', 'QATMethod', 'check_qat_method', 'qat_qconfig', 'prepare_qat', 'prepare_f8net', 'distill_loss']
