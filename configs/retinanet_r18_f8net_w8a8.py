# RetinaNet-R18 on the local fashion_det set, F8Net quantization-aware training at W8A8 from the
# float detector (python tools/train.py configs/retinanet_r18_fpn_fashiondet.py):
#   python tools/train.py configs/retinanet_r18_f8net_w8a8.py
# The backbone's convs fold their BatchNorm; the FPN and head convs (no BatchNorm) are plain
# fixed-point convs with PACT inputs. The stem and the two prediction convs are named as the
# input / output layers (8-bit, like every layer at W8A8).
_base_ = ['./retinanet_r18_fpn_fashiondet.py', './_base_/quant/f8net_w8a8.py']
load_from = 'work_dirs/retinanet_r18_fpn_fashiondet/epoch_6.pth'
quant = dict(first_layers=['backbone.conv1'], last_layers=['bbox_head.retina_cls', 'bbox_head.retina_reg'])
max_epochs = 2
optim_wrapper = dict(optimizer=dict(lr=0.001))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs,
                        eta_min=0.0, convert_to_iter_based=True)]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
