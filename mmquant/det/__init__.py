"""mmdet models registered into mmdet's ``MODELS`` when ``mmquant`` is imported (mmdet installed)."""
from .blender import blend, blender, crop_bases, mask_loss
from .blendmask import BlendMask
from .blendmask_head import BlendMaskBottom, BlendMaskHead
from .level_norm import LevelBN

__all__ = ['BlendMask', 'BlendMaskHead', 'BlendMaskBottom', 'blend', 'blender', 'crop_bases', 'mask_loss', 'LevelBN']
