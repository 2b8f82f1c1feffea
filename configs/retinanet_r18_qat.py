# The QAT fine-tune of RetinaNet-R18 on the local fashion_det set, shared by the method recipes
# (retinanet_r18_lsq_w4a4.py, retinanet_r18_f8net_w8a8.py): from the float detector
# (python tools/train.py configs/retinanet_r18_fpn_fashiondet.py), 2 epochs at lr 0.001, cosine.
# A recipe adds a scheme from _base_/quant/ and names the stem and the two prediction convs as the
# input / output layers (quant.first_layers / last_layers).
_base_ = ['./retinanet_r18_fpn_fashiondet.py']
load_from = 'work_dirs/retinanet_r18_fpn_fashiondet/epoch_6.pth'
max_epochs = 2
optim_wrapper = dict(optimizer=dict(lr=0.001))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs,
                        eta_min=0.0, convert_to_iter_based=True)]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
