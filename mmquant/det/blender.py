"""The BlendMask blender (Chen et al., CVPR 2020, Sec. 3.3) and its mask loss, as plain functions.

For a detection ``d`` with box ``p_d`` and attention ``a_d`` (K x M x M) over the K bases ``B``:

    r_d = RoIAlign_{R x R}(B, p_d)               (crop the bases, "RoIPooler" in the paper)
    a'_d = interpolate_{M -> R}(a_d)              (bilinear upsampling of the attention)
    s_d = softmax_K(a'_d)                         (normalise over the K bases, per pixel)
    m_d = sum_k s_d^k o r_d^k                     (element-wise product, summed: mask logits)

and the mask loss is the per-pixel binary cross-entropy between ``m_d`` and the ground-truth mask
cropped and resized to the same box at R x R.
"""
import torch
import torch.nn.functional as F
from mmcv.ops import roi_align
from torch import Tensor


def crop_bases(bases: Tensor, rois: Tensor, size: int, stride: float, sampling_ratio: int = 1) -> Tensor:
    """``r_d``: RoIAlign (aligned, average) of every base over each box.

    Args:
        bases: (N, K, H, W) bases of a batch, at ``stride`` pixels per base cell.
        rois: (n, 5) rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
        size: R, the blender resolution.
    Returns:
        (n, K, R, R)
    """
    if rois.numel() == 0:
        return bases.new_zeros((0, bases.size(1), size, size))
    return roi_align(bases, rois.to(bases.dtype), (size, size), 1.0 / stride, sampling_ratio, 'avg', True)


def blend(cropped_bases: Tensor, attns: Tensor) -> Tensor:
    """``m_d = sum_k softmax_K(interpolate_{M->R}(a_d))^k o r_d^k``.

    Args:
        cropped_bases: (n, K, R, R), the output of :func:`crop_bases`.
        attns: (n, K, M, M) attentions.
    Returns:
        (n, R, R) mask logits.
    """
    size = cropped_bases.shape[-2:]
    if attns.shape[-2:] != size:
        attns = F.interpolate(attns, size=size, mode='bilinear', align_corners=False)
    return (attns.softmax(dim=1) * cropped_bases).sum(dim=1)


def blender(bases: Tensor, rois: Tensor, attns: Tensor, size: int, stride: float,
            sampling_ratio: int = 1) -> Tensor:
    """The whole blender: bases (N, K, H, W), rois (n, 5), attns (n, K, M, M) -> (n, R, R) logits."""
    return blend(crop_bases(bases, rois, size, stride, sampling_ratio), attns)


def mask_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel binary cross-entropy with logits, averaged over masks and pixels.

    >>> round(mask_loss(torch.zeros(2, 3, 3), torch.ones(2, 3, 3)).item(), 4)  # ln 2
    0.6931
    """
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction='mean')
