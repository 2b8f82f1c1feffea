# RetinaNet-R18 on the local fashion_det set with GroupNorm (32 groups) in the FPN and the head, the
# normalisation of FCOS's head; ./retinanet_r18_fpn_bn_fashiondet.py is the BatchNorm variant.
#   python tools/train.py configs/retinanet_r18_fpn_gn_fashiondet.py
_base_ = ['./retinanet_r18_fpn_fashiondet.py']
gn = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(neck=dict(norm_cfg=gn), bbox_head=dict(norm_cfg=gn))
