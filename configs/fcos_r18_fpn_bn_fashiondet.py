# FCOS-R18 on the local fashion_det set with multi-level BatchNorm in the head instead of the stock
# GroupNorm (AQD, CVPR 2021: shared head convs, one BN per FPN level; mmquant/det/level_norm.py) and
# BatchNorm in the FPN.
#   python tools/train.py configs/fcos_r18_fpn_bn_fashiondet.py
_base_ = ['./fcos_r18_fpn_fashiondet.py']
model = dict(
    neck=dict(norm_cfg=dict(type='BN', requires_grad=True)),
    bbox_head=dict(norm_cfg=dict(type='LevelBN', num_levels=5, requires_grad=True)))
