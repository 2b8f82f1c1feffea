"""Data transforms the recipes need and mmpretrain lacks."""
import numpy as np
from mmcv.transforms import BaseTransform
from mmengine.registry import TRANSFORMS


@TRANSFORMS.register_module()
class RepeatChannels(BaseTransform):
    """Repeat a grey image ``(H, W)`` or ``(H, W, 1)`` to ``(H, W, channels)``, for stock
    backbones whose stem is hard-wired to 3 input channels (mmpretrain's VGG)."""

    def __init__(self, channels: int = 3):
        self.channels = channels

    def transform(self, results):
        img = results['img']
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] != 1:
            raise ValueError(f'RepeatChannels expects a 1-channel image, got shape {img.shape}')
        results['img'] = np.ascontiguousarray(np.repeat(img, self.channels, axis=-1))
        return results
