"""BlendMask head (Chen et al., "BlendMask: Top-Down Meets Bottom-Up for Instance Segmentation",
CVPR 2020): an FCOS head plus the paper's two extra branches,

* the *top layer* (Sec. 3.2): one 3x3 conv on the FCOS box tower predicting, at every location,
  an attention ``a_d`` of K x M x M;
* the *bottom module* (Sec. 3.2): a small decoder over FPN P3..P5 predicting K bases ``B`` at
  stride 4 (stride of P3 / ``bottom_upsample``);

which the blender (:mod:`mmquant.det.blender`) combines into R x R mask logits per detection.
All convs are ``nn.Conv2d`` (inside ``ConvModule`` or bare), so module-swapping quantization
covers both branches.
"""
import copy
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor

from mmdet.models.dense_heads import FCOSHead
from mmdet.models.dense_heads.anchor_free_head import AnchorFreeHead
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
from mmdet.models.utils import filter_scores_and_topk, multi_apply, select_single_mlvl
from mmdet.registry import MODELS
from mmdet.structures.bbox import get_box_tensor, scale_boxes

from .blender import blend, blender, crop_bases, mask_loss


class BlendMaskBottom(BaseModule):
    """Bottom module: 3x3 refine conv per FPN level, sum at the finest level (upsampling the others
    bilinearly), ``num_convs`` 3x3 convs, x``upsample`` bilinear, one 3x3 conv, 1x1 conv to K bases."""

    def __init__(self, in_channels: int, channels: int, num_bases: int, num_levels: int = 3,
                 num_convs: int = 2, upsample: int = 2, conv_cfg=None, norm_cfg=None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        conv = dict(kernel_size=3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg)
        self.upsample = upsample
        self.refine = nn.ModuleList([ConvModule(in_channels, channels, **conv) for _ in range(num_levels)])
        self.tower = nn.Sequential(*[ConvModule(channels, channels, **conv) for _ in range(num_convs)])
        self.post = ConvModule(channels, channels, **conv) if upsample > 1 else nn.Identity()
        self.conv_bases = nn.Conv2d(channels, num_bases, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.refine[0](feats[0])
        for conv, feat in zip(self.refine[1:], feats[1:]):
            x = x + F.interpolate(conv(feat), size=x.shape[-2:], mode='bilinear', align_corners=False)
        x = self.tower(x)
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode='bilinear', align_corners=False)
        return self.conv_bases(self.post(x))


@MODELS.register_module()
class BlendMaskHead(FCOSHead):
    """FCOS head with BlendMask's top layer, bottom module and blender.

    ``forward`` returns ``(cls_scores, bbox_preds, centernesses, attns, bases)``: the FCOS outputs,
    the per-level attentions (N, K*M*M, H, W) and the bases (N, K, H/4, W/4).

    Args:
        num_bases: K. attn_size: M. mask_size: R, the blender resolution (paper: 4, 14, 56).
        bottom_channels / bottom_levels / bottom_convs / bottom_upsample: the bottom module
            (channels, number of FPN levels it reads, 3x3 convs before upsampling, upsampling
            factor relative to the first level's stride).
        max_masks_per_img: positive locations sampled per image for the mask loss (-1: all).
        loss_mask_weight: weight of the per-pixel BCE mask loss.
        sampling_ratio: RoIAlign samples per bin when cropping the bases.
    """

    def __init__(self, *args, num_bases: int = 4, attn_size: int = 14, mask_size: int = 56,
                 bottom_channels: int = 128, bottom_levels: int = 3, bottom_convs: int = 2,
                 bottom_upsample: int = 2, max_masks_per_img: int = 64, loss_mask_weight: float = 1.0,
                 sampling_ratio: int = 1, **kwargs) -> None:
        self.num_bases, self.attn_size, self.mask_size = num_bases, attn_size, mask_size
        self.bottom_cfg = dict(channels=bottom_channels, num_levels=bottom_levels,
                               num_convs=bottom_convs, upsample=bottom_upsample)
        self.max_masks_per_img = max_masks_per_img
        self.loss_mask_weight = loss_mask_weight
        self.sampling_ratio = sampling_ratio
        super().__init__(*args, **kwargs)
        self.bases_stride = self.strides[0] / bottom_upsample

    def _init_layers(self) -> None:
        super()._init_layers()
        self.top_layer = nn.Conv2d(self.feat_channels, self.num_bases * self.attn_size ** 2, 3, padding=1)
        self.bottom = BlendMaskBottom(self.in_channels, num_bases=self.num_bases, conv_cfg=self.conv_cfg,
                                      norm_cfg=self.norm_cfg, **self.bottom_cfg)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Sequence[Tensor]) -> tuple:
        cls_scores, bbox_preds, centernesses, attns = multi_apply(
            self.forward_single, x, self.scales, self.strides)
        bases = self.bottom(x[:self.bottom_cfg['num_levels']])
        return cls_scores, bbox_preds, centernesses, attns, bases

    def forward_single(self, x: Tensor, scale, stride: int) -> tuple:
        """FCOS outputs of one level, plus the top layer's attention from the box tower."""
        cls_score, bbox_pred, cls_feat, reg_feat = AnchorFreeHead.forward_single(self, x)
        centerness = self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat)
        bbox_pred = scale(bbox_pred).float()
        if self.norm_on_bbox:
            bbox_pred = bbox_pred.clamp(min=0)
            if not self.training:
                bbox_pred = bbox_pred * stride
        else:
            bbox_pred = bbox_pred.exp()
        return cls_score, bbox_pred, centerness, self.top_layer(reg_feat)

    # ------------------------------------------------------------------ training
    def loss_by_feat(self, cls_scores, bbox_preds, centernesses, attns, bases, batch_gt_instances,
                     batch_img_metas, batch_gt_instances_ignore=None) -> dict:
        losses = super().loss_by_feat(cls_scores, bbox_preds, centernesses, batch_gt_instances,
                                      batch_img_metas, batch_gt_instances_ignore)
        losses['loss_mask'] = self.loss_mask_by_feat(attns, bases, batch_gt_instances)
        return losses

    def matched_gt_inds(self, points: List[Tensor], batch_gt_instances) -> Tensor:
        """Index (into the batch's concatenated GT instances) of the GT that FCOS assigns to every
        location, -1 for background, in the order of FCOS's flattened predictions (level, image,
        location).

        FCOS's own assignment (``get_targets``: inside box / center region, regress range, smallest
        area) is run with each instance's label replaced by ``global_index - num_gts``: every
        foreground label is then negative and background is ``num_classes``, so the two never clash.
        """
        counts = [len(gt) for gt in batch_gt_instances]
        total = sum(counts)
        starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
        indexed = [InstanceData(bboxes=get_box_tensor(gt.bboxes),
                                labels=torch.arange(s, s + n, device=points[0].device) - total)
                   for gt, s, n in zip(batch_gt_instances, starts, counts)]
        labels, _ = self.get_targets(points, indexed)
        labels = torch.cat(labels)
        return torch.where(labels < 0, labels + total, torch.full_like(labels, -1))

    def sample_per_image(self, pos: Tensor, img_inds: Tensor) -> Tensor:
        """At most ``max_masks_per_img`` of the positive locations ``pos`` per image, at random."""
        k = self.max_masks_per_img
        if k is None or k < 0 or pos.numel() == 0:
            return pos
        order = torch.argsort(img_inds.double() + torch.rand(len(pos), dtype=torch.double, device=pos.device))
        img_sorted = img_inds[order]
        counts = torch.bincount(img_sorted)
        rank = torch.arange(len(pos), device=pos.device) - (counts.cumsum(0) - counts)[img_sorted]
        return pos[order[rank < k]].sort().values

    def mask_targets(self, batch_gt_instances, gt_inds: Tensor, gt_img: Tensor, boxes: Tensor) -> Tensor:
        """GT masks ``gt_inds`` (batch-global) cropped to ``boxes`` and resized to R x R, binary."""
        targets = boxes.new_zeros((len(gt_inds), self.mask_size, self.mask_size))
        offset = 0
        for i, gt in enumerate(batch_gt_instances):
            sel = (gt_img[gt_inds] == i).nonzero().squeeze(1)
            if sel.numel():
                crops = gt.masks.crop_and_resize(boxes[sel], (self.mask_size, self.mask_size),
                                                 gt_inds[sel] - offset, device=boxes.device)
                targets[sel] = crops.to_tensor(dtype=boxes.dtype, device=boxes.device)
            offset += len(gt)
        return targets

    def loss_mask_by_feat(self, attns: List[Tensor], bases: Tensor, batch_gt_instances) -> Tensor:
        """Mask loss: for (sampled) positive locations, blend the bases cropped to the *GT box* of
        the matched instance with the location's attention, BCE against the GT mask in that box."""
        points = self.prior_generator.grid_priors([a.shape[-2:] for a in attns], dtype=bases.dtype,
                                                  device=bases.device)
        gt_of_loc = self.matched_gt_inds(points, batch_gt_instances)
        flat_attns = torch.cat([a.permute(0, 2, 3, 1).reshape(-1, a.size(1)) for a in attns])
        gt_img = torch.cat([torch.full((len(gt),), i, dtype=torch.long, device=bases.device)
                            for i, gt in enumerate(batch_gt_instances)] + [gt_of_loc.new_zeros(0)])
        pos = (gt_of_loc >= 0).nonzero().squeeze(1)
        pos = self.sample_per_image(pos, gt_img[gt_of_loc[pos]])
        if pos.numel() == 0:  # keep both branches in the graph
            return flat_attns.sum() * 0 + bases.sum() * 0
        # all positives of an instance share its GT box, so crop bases and masks once per instance
        gt_inds, inverse = torch.unique(gt_of_loc[pos], return_inverse=True)
        gt_boxes = torch.cat([get_box_tensor(gt.bboxes) for gt in batch_gt_instances])[gt_inds]
        rois = torch.cat([gt_img[gt_inds, None].to(gt_boxes.dtype), gt_boxes], dim=1)
        cropped = crop_bases(bases, rois, self.mask_size, self.bases_stride, self.sampling_ratio)
        targets = self.mask_targets(batch_gt_instances, gt_inds, gt_img, gt_boxes)
        k, m = self.num_bases, self.attn_size
        logits = blend(cropped[inverse], flat_attns[pos].view(-1, k, m, m))
        return self.loss_mask_weight * mask_loss(logits, targets[inverse])

    # ------------------------------------------------------------------ inference
    def predict_by_feat(self, cls_scores, bbox_preds, centernesses, attns, bases,
                        batch_img_metas: Optional[List[dict]] = None, cfg=None, rescale: bool = False,
                        with_nms: bool = True) -> List[InstanceData]:
        """FCOS post-processing that carries each candidate's attention through score filtering
        and NMS, then blends the kept detections' masks and pastes them into the image."""
        cfg = copy.deepcopy(self.test_cfg if cfg is None else cfg)
        mlvl_priors = self.prior_generator.grid_priors(
            [c.shape[-2:] for c in cls_scores], dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        results_list = []
        for img_id, img_meta in enumerate(batch_img_metas):
            results = self._predict_boxes_single(
                *[select_single_mlvl(t, img_id, detach=True) for t in (cls_scores, bbox_preds, centernesses, attns)],
                mlvl_priors, img_meta, cfg, with_nms)
            results_list.append(self._predict_masks_single(results, bases[img_id:img_id + 1].detach(),
                                                           img_meta, cfg, rescale))
        return results_list

    def _predict_boxes_single(self, cls_scores, bbox_preds, centernesses, attns, mlvl_priors, img_meta,
                              cfg, with_nms) -> InstanceData:
        fields = dict(bboxes=[], scores=[], labels=[], score_factors=[], attns=[])
        for cls_score, bbox_pred, centerness, attn, priors in zip(cls_scores, bbox_preds, centernesses,
                                                                  attns, mlvl_priors):
            scores = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels).sigmoid()
            candidates = dict(bbox_pred=bbox_pred.permute(1, 2, 0).reshape(-1, 4), priors=priors,
                              centerness=centerness.permute(1, 2, 0).reshape(-1).sigmoid(),
                              attn=attn.permute(1, 2, 0).reshape(-1, attn.size(0)))
            scores, labels, _, kept = filter_scores_and_topk(
                scores, cfg.get('score_thr', 0), cfg.get('nms_pre', -1), candidates)
            fields['bboxes'].append(self.bbox_coder.decode(kept['priors'], kept['bbox_pred'],
                                                           max_shape=img_meta['img_shape']))
            fields['scores'].append(scores)
            fields['labels'].append(labels)
            fields['score_factors'].append(kept['centerness'])
            fields['attns'].append(kept['attn'])
        results = InstanceData(**{k: torch.cat(v) for k, v in fields.items()})
        # scores * centerness, min size, NMS, max_per_img; every field (attns too) is indexed along
        return self._bbox_post_process(results, cfg, rescale=False, with_nms=with_nms, img_meta=img_meta)

    def _predict_masks_single(self, results: InstanceData, bases: Tensor, img_meta: dict, cfg,
                              rescale: bool) -> InstanceData:
        attns = results.pop('attns')
        if rescale:
            scale = [1 / s for s in img_meta.get('scale_factor', (1.0, 1.0))]
            height, width = img_meta['ori_shape'][:2]
        else:
            height, width = img_meta['img_shape'][:2]
        if len(results) == 0:
            results.masks = torch.zeros((0, height, width), dtype=torch.bool, device=bases.device)
            return results
        rois = torch.cat([results.bboxes.new_zeros((len(results), 1)), results.bboxes], dim=1)
        k, m = self.num_bases, self.attn_size
        probs = blender(bases, rois, attns.view(-1, k, m, m), self.mask_size, self.bases_stride,
                        self.sampling_ratio).sigmoid()[:, None]
        if rescale:
            results.bboxes = scale_boxes(results.bboxes, scale)
        thr = cfg.get('mask_thr_binary', 0.5)
        results.masks = torch.cat([
            _do_paste_mask(p, b, height, width, skip_empty=False)[0] >= thr
            for p, b in zip(probs.split(64), results.bboxes.split(64))])
        return results
