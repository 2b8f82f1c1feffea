# RetinaNet-R18 on the local fashion_det set with BatchNorm in the FPN and multi-level BatchNorm in
# the head (AQD, Chen, Zhuang et al., CVPR 2021: the head convs stay shared across the 5 FPN levels,
# each level has its own BN statistics and affine; mmquant/det/level_norm.py). Stock RetinaNet has
# no normalisation in FPN and head; ./retinanet_r18_fpn_gn_fashiondet.py is the GroupNorm variant.
# The FPN's BNs fold into their convs for integer deployment (fold_bn); GroupNorm cannot.
#   python tools/train.py configs/retinanet_r18_fpn_bn_fashiondet.py
_base_ = ['./retinanet_r18_fpn_fashiondet.py']
model = dict(
    neck=dict(norm_cfg=dict(type='BN', requires_grad=True)),
    bbox_head=dict(norm_cfg=dict(type='LevelBN', num_levels=5, requires_grad=True)))
