# RetinaNet-R18 on the local fashion_det set, LSQ quantization-aware training at W4A4 from the
# float detector (the fine-tune recipe of retinanet_r18_qat.py):
#   python tools/train.py configs/retinanet_r18_lsq_w4a4.py
# The stem and the two prediction convs (classes, boxes) stay 8-bit.
_base_ = ['./retinanet_r18_qat.py', './_base_/quant/lsq_w4a4.py']
quant = dict(first_layers=['backbone.conv1'], last_layers=['bbox_head.retina_cls', 'bbox_head.retina_reg'])
