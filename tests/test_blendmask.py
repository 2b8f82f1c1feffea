"""BlendMask (mmquant/det/): the blender against hand computations, the mask loss, a tiny model from
the config (loss, backward, predict with image-size masks) and full module-swapping conversion."""
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmquant
from mmquant import QConfig, convert
from mmquant.calibrate import calibrate
from mmquant.det import blend, blender, crop_bases, mask_loss
from mmquant.engine import tensor_forward

CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'blendmask_r18_fpn_fashiondet.py')


def test_blender_shapes():
    bases = torch.randn(2, 4, 16, 16)
    rois = torch.tensor([[0, 4.0, 4.0, 40.0, 50.0], [1, 0.0, 0.0, 64.0, 64.0], [1, 10.0, 20.0, 30.0, 22.0]])
    assert crop_bases(bases, rois, 56, stride=4).shape == (3, 4, 56, 56)
    assert blender(bases, rois, torch.randn(3, 4, 14, 14), 56, stride=4).shape == (3, 56, 56)
    assert blender(bases, rois[:0], torch.randn(0, 4, 14, 14), 56, stride=4).shape == (0, 56, 56)


def test_blender_softmax_weights_constant_bases():
    # K=2 constant bases 4 and 8, attention logits 0 and ln 3 -> weights 1/4, 3/4 -> 1 + 6 = 7 everywhere
    bases = torch.stack([torch.full((8, 8), 4.0), torch.full((8, 8), 8.0)])[None]
    attns = torch.stack([torch.zeros(2, 2), torch.full((2, 2), math.log(3.0))])[None]
    out = blender(bases, torch.tensor([[0, 3.0, 5.0, 20.0, 27.0]]), attns, size=6, stride=4)
    torch.testing.assert_close(out, torch.full((1, 6, 6), 7.0))


def test_blender_crops_the_box_region():
    # base value 10 * row + col at stride 4; the image box x 8..24, y 4..20 is base cells x 2..6,
    # y 1..5, so an aligned 4x4 RoIAlign samples the cell centres: rows 1..4, cols 2..5
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing='ij')
    bases = (10 * rows + cols)[None, None]
    rois = torch.tensor([[0, 8.0, 4.0, 24.0, 20.0]])
    expected = (10 * rows[1:5, 2:6] + cols[1:5, 2:6])[None]
    torch.testing.assert_close(blender(bases, rois, torch.randn(1, 1, 3, 3), size=4, stride=4), expected)
    # two bases with equal attention: the mean of the ramp and a constant 2
    two = torch.cat([bases, torch.full_like(bases, 2.0)], dim=1)
    cropped = crop_bases(two, rois, 4, stride=4)
    torch.testing.assert_close(blend(cropped, torch.zeros(1, 2, 7, 7)), (expected + 2) / 2)


def test_mask_loss_hand_cases():
    target = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert mask_loss(30 * (2 * target - 1), target).item() < 1e-6
    assert mask_loss(torch.zeros(3, 8, 8), target).item() == pytest.approx(math.log(2), abs=1e-6)


def tiny_model(size=64):
    """The config's BlendMask with narrow FPN / head / bottom module (fast on one thread)."""
    cfg = Config.fromfile(CONFIG)
    init_default_scope('mmdet')
    model_cfg = cfg.model
    model_cfg.neck.out_channels = 32
    model_cfg.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=1, bottom_channels=32,
                               num_bases=2, attn_size=4, mask_size=8,
                               norm_cfg=dict(type='GN', num_groups=8, requires_grad=True))
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    return MODELS.build(model_cfg)


def det_batch(size=64, ori=None, n=2):
    """Synthetic images with two rectangular instances each; ``ori`` != size mimics a Resize."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(0)
    ori = ori or size
    samples = []
    for _ in range(n):
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(ori, ori), scale_factor=(size / ori, size / ori),
            pad_shape=(size, size), batch_input_shape=(size, size)))
        inst = InstanceData(bboxes=torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 30.0, 60.0, 58.0]]),
                            labels=torch.tensor([1, 7]))
        masks = np.zeros((2, size, size), dtype=np.uint8)
        masks[0, 6:40, 4:30] = 1
        masks[1, 30:58, 28:60] = 1
        inst.masks = BitmapMasks(masks, size, size)
        sample.gt_instances = inst
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)],
                data_samples=samples)


def test_matched_gt_inds_follow_fcos_assignment():
    head = tiny_model().bbox_head
    batch = det_batch(n=2)
    gts = [s.gt_instances for s in batch['data_samples']]
    sizes = [(64 // s, 64 // s) for s in head.strides]
    points = head.prior_generator.grid_priors(sizes, device='cpu')
    labels = torch.cat(head.get_targets(points, gts)[0])
    inds = head.matched_gt_inds(points, gts)
    assert ((labels < head.num_classes) == (inds >= 0)).all() and (inds >= 0).any()
    all_labels = torch.cat([gt.labels for gt in gts])
    assert torch.equal(all_labels[inds[inds >= 0]], labels[inds >= 0])
    # the second image's locations point at the second image's instances (global indices 2, 3)
    per_level = [len(p) for p in points]
    second = torch.cat([lvl[n:] for lvl, n in zip(inds.split([2 * n for n in per_level]), per_level)])
    assert set(second[second >= 0].tolist()) <= {2, 3}
    head.max_masks_per_img = 3
    pos = (inds >= 0).nonzero().squeeze(1)
    img = (inds[pos] >= 2).long()
    kept = head.sample_per_image(pos, img)
    assert torch.bincount(img[torch.isin(pos, kept)]).tolist() == [3, 3]


def test_tiny_blendmask_loss_backward_predict():
    model = tiny_model()
    model.train()
    batch = det_batch()
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    assert {'loss_cls', 'loss_bbox', 'loss_centerness', 'loss_mask'} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.bbox_head
    for p in (head.top_layer.weight, head.bottom.conv_bases.weight, head.bottom.refine[0].conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    head.test_cfg.score_thr = 0.0  # keep detections from an untrained model
    with torch.no_grad():
        preds = model.test_step(det_batch(ori=96))
    pred = preds[0].pred_instances
    assert len(pred) > 0 and pred.masks.dtype == torch.bool and pred.masks.shape[1:] == (96, 96)
    assert pred.bboxes.shape == (len(pred), 4) and pred.scores.shape == pred.labels.shape == (len(pred),)


def test_blendmask_fully_swapped_and_predicts():
    model = tiny_model().eval()
    batch = det_batch(n=1)
    report = convert(model, QConfig.build(bits='w4a8'), example_forward=lambda: tensor_forward(model, batch))
    floats = [n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not isinstance(m, mmquant.nn.QUANT_LAYERS)]
    assert floats == [] and report.kept_float == []
    names = {r.name for r in report.quantized}
    assert {'bbox_head.top_layer', 'bbox_head.bottom.conv_bases', 'bbox_head.bottom.post.conv',
            'bbox_head.bottom.refine.0.conv'} <= names
    calibrate(model, [batch], forward_fn=tensor_forward)
    model.bbox_head.test_cfg.score_thr = 0.0
    with torch.no_grad():
        pred = model.test_step(batch)[0].pred_instances
    assert len(pred) > 0 and pred.masks.shape[1:] == (64, 64)


def test_recipes_score_masks_only_where_the_model_predicts_them():
    root = osp.dirname(CONFIG)
    assert Config.fromfile(CONFIG).test_evaluator.metric == ['bbox', 'segm']
    assert Config.fromfile(osp.join(root, 'mask-rcnn_r18_fpn_fashiondet.py')).test_evaluator.metric == ['bbox', 'segm']
    for name in ('fcos', 'retinanet'):
        assert Config.fromfile(osp.join(root, f'{name}_r18_fpn_fashiondet.py')).test_evaluator.metric == 'bbox'
