"""Multi-level BatchNorm for detection heads shared across FPN levels.

RetinaNet's and FCOS's heads run the same convs on every FPN level. Their stock normalisation is
GroupNorm (FCOS) or none (RetinaNet): GroupNorm cannot be folded into a conv, so an integer
deployment runs it in float, and a single BatchNorm shared by all levels mixes statistics that
differ from level to level (more so once the features are quantized). AQD (Chen, Zhuang et al.,
"AQD: Towards Accurate Quantized Object Detection", CVPR 2021, Sec. 3.3) keeps the convs shared
and gives each level its own BatchNorm ("multi-level BN"); QTool's detection configs offer the
same switch. :class:`LevelBN` is that layer, usable wherever mmcv takes a ``norm_cfg``::

    bbox_head=dict(norm_cfg=dict(type='LevelBN', num_levels=5, requires_grad=True))

It holds ``num_levels`` BatchNorms and picks one per call. Heads call each shared layer once per
level, from the finest (largest) map to the coarsest, and FPN maps never grow with the level, so
the level is read from the call sequence: a call whose map is larger than the previous call's,
or a first call, is level 0; any other call is the next level. A call past ``num_levels`` is an
error naming the mismatch. Each level's BN folds into its own copy of the conv for deployment;
:func:`mmquant.fold_bn.fold_bn` does not do that (the conv stays shared), so a quantized head with
LevelBN keeps its BatchNorms in float, as it would GroupNorm.
"""
from mmengine.registry import MODELS
from torch import nn


@MODELS.register_module()
class LevelBN(nn.Module):
    """``num_levels`` ``BatchNorm2d`` of ``num_features``; the call sequence picks the level."""
    _abbr_ = 'bn'

    def __init__(self, num_features: int, num_levels: int = 5, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f'LevelBN num_levels={num_levels!r}: expected a positive int (the FPN levels)')
        self.num_features, self.num_levels = num_features, num_levels
        self.bns = nn.ModuleList(nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
                                 for _ in range(num_levels))
        self._last = None        # (level, area) of the previous call

    def level_of(self, x) -> int:
        area = x.shape[-2] * x.shape[-1]
        if self._last is None or area > self._last[1]:
            level = 0
        else:
            level = self._last[0] + 1
            if level >= self.num_levels:
                raise RuntimeError(f'LevelBN has num_levels={self.num_levels} but was called on a '
                                   f'{level + 1}th consecutive map no larger than the previous one; '
                                   f'set num_levels to the number of FPN levels the head sees')
        self._last = (level, area)
        return level

    def forward(self, x):
        return self.bns[self.level_of(x)](x)

    def extra_repr(self):
        return f'{self.num_features}, num_levels={self.num_levels}'


__all__ = ['LevelBN']
