# RetinaNet-R18 on the local fashion_det set, F8Net quantization-aware training at W8A8 from the
# float detector (the fine-tune recipe of retinanet_r18_qat.py):
#   python tools/train.py configs/retinanet_r18_f8net_w8a8.py
# The backbone's convs fold their BatchNorm; the FPN and head convs (no BatchNorm) are plain
# fixed-point convs with PACT inputs. The stem and the two prediction convs are named as the
# input / output layers (8-bit, like every layer at W8A8).
_base_ = ['./retinanet_r18_qat.py', './_base_/quant/f8net_w8a8.py']
quant = dict(first_layers=['backbone.conv1'], last_layers=['bbox_head.retina_cls', 'bbox_head.retina_reg'])
