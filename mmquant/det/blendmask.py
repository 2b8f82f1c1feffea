"""BlendMask detector (Chen et al., "BlendMask: Top-Down Meets Bottom-Up for Instance
Segmentation", CVPR 2020): backbone + FPN + :class:`~mmquant.det.blendmask_head.BlendMaskHead`.

The head does detection and masks in one pass, so the single-stage detector's ``loss`` /
``predict`` / ``_forward`` (tensor mode) apply unchanged; ``predict`` returns ``pred_instances``
with ``bboxes``, ``scores``, ``labels`` and boolean ``masks`` (N, H, W), as ``CocoMetric``
(``metric=['bbox', 'segm']``) expects.
"""
from mmdet.models.detectors import SingleStageDetector
from mmdet.registry import MODELS


@MODELS.register_module()
class BlendMask(SingleStageDetector):
    """Single-stage instance segmentor: FCOS boxes, blended masks (``bbox_head=BlendMaskHead``)."""
