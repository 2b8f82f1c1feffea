# BlendMask (Chen et al., CVPR 2020; mmquant/det/) on the FCOS of configs/fcos_r18_fpn_fashiondet.py
# (ResNet-18 + FPN from scratch, same data, schedule and optimizer): mmdet's FCOS head plus
# BlendMask's top layer (per-location K x M x M attentions), bottom module (K bases at stride 4)
# and blender, trained on the instance masks of the local fashion_det set.
_base_ = ['./fcos_r18_fpn_fashiondet.py']

model = dict(
    type='BlendMask',
    bbox_head=dict(
        type='BlendMaskHead',
        # the paper's defaults: K = 4 bases, M = 14 attentions, R = 56 blender output
        num_bases=4,
        attn_size=14,
        mask_size=56,
        bottom_channels=128,
        bottom_levels=3,          # P3..P5 feed the bottom module
        bottom_convs=2,
        bottom_upsample=2,        # stride 8 -> 4
        max_masks_per_img=64,     # positive locations per image that get a mask loss
        loss_mask_weight=1.0),
    test_cfg=dict(mask_thr_binary=0.5))
# boxes and masks (the FCOS recipe scores boxes only)
val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator
