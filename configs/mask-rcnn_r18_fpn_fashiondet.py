# Stock mmdet Mask R-CNN (ResNet-18 + FPN, the mask-rcnn_r50_fpn.py architecture with depth 18)
# trained from scratch on the local fashion_det set (tools/make_detection_set.py) on the CPU.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', './_base_/fashion_det_cpu.py']

channels = 128   # FPN / head width (256 in the COCO recipe); the heads dominate the cost here
model = dict(
    # from scratch: no pretrained weights (nothing is downloaded), so no frozen stem and BN trains
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    # RoIAlign through torchvision's kernel (identical output, about 4x faster than mmcv 2.1.0's on
    # this CPU: 0.09 s vs 0.35 s for 1024 RoIs of 128 x 7 x 7, one thread). Four sampling points
    # per bin (sampling_ratio=2) as in the Mask R-CNN paper, instead of mmdet's adaptive count, which
    # samples up to 5 x 5 points per bin on the large RoIs of the stride-4 level and made RoIAlign's
    # backward a quarter of the training step here
    roi_head=dict(
        bbox_roi_extractor=dict(
            out_channels=channels,
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2, use_torchvision=True)),
        bbox_head=dict(in_channels=channels, fc_out_channels=512, num_classes=10),
        mask_roi_extractor=dict(
            out_channels=channels,
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=2, use_torchvision=True)),
        # the mask head runs 4 convs on every positive RoI: 64 wide (256 on COCO) keeps it affordable
        mask_head=dict(in_channels=channels, conv_out_channels=64, num_classes=10)),
    # a 128x128 canvas holds 2-5 objects: fewer proposals and sampled RoIs than on COCO images
    # (32 RoIs per image, at most 8 positive, against 512 on COCO)
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=300)))
