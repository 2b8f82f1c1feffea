"""mmquant: quantization for OpenMMLab models by module swapping.

The math (``quantizers``, ``observers``, ``nn``, ``convert``, ``calibrate``, ``ptq``) needs torch
only. Importing ``mmquant`` with mmengine installed also registers the OpenMMLab entry points
(``QuantizedModel``, ``PTQLoop``, hooks), and with mmpretrain installed the ``OrderedResNet``
backbone (:mod:`mmquant.models`), which is what ``custom_imports=['mmquant']`` relies on.
"""
from importlib.util import find_spec

from .api import quantize
from .calibrate import calibrate
from .convert import ConversionReport, convert
from .qconfig import LayerQConfig, QConfig, parse_bits
from .version import __version__

if find_spec('mmengine') is not None:
    from . import engine  # noqa: F401  (registers the OpenMMLab entry points)
if find_spec('mmpretrain') is not None:
    from . import models  # noqa: F401  (registers OrderedResNet in mmpretrain's MODELS)

__all__ = ['__version__', 'quantize', 'convert', 'calibrate', 'ConversionReport', 'QConfig',
           'LayerQConfig', 'parse_bits']
