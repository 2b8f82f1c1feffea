# FCOS-R18 on the local fashion_det set, DoReFa quantization-aware training at W2A2 from the
# float detector (python tools/train.py configs/fcos_r18_fpn_fashiondet.py):
#   python tools/train.py configs/fcos_r18_dorefa_w2a2.py
# The stem and the three prediction convs (classes, boxes, centerness) stay 8-bit.
_base_ = ['./fcos_r18_fpn_fashiondet.py', './_base_/quant/dorefa_w2a2.py']
load_from = 'work_dirs/fcos_r18_fpn_fashiondet/epoch_6.pth'
quant = dict(first_layers=['backbone.conv1'],
             last_layers=['bbox_head.conv_cls', 'bbox_head.conv_reg', 'bbox_head.conv_centerness'])
# fine-tune: 2 epochs at a tenth of the float lr
max_epochs = 2
optim_wrapper = dict(optimizer=dict(lr=0.001))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs,
                        eta_min=0.0, convert_to_iter_based=True)]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
