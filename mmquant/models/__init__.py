"""mmpretrain models registered into mmpretrain's ``MODELS`` when ``mmquant`` is imported
(mmpretrain installed)."""
from .ordered_resnet import (BLOCK_ORDERS, DOWNSAMPLE_STYLES, STEMS, OrderedBasicBlock, OrderedResNet, ScalarBias,
                             SpaceToDepth)

__all__ = ['OrderedResNet', 'OrderedBasicBlock', 'BLOCK_ORDERS', 'DOWNSAMPLE_STYLES', 'STEMS', 'ScalarBias',
           'SpaceToDepth']
