# A CPU recipe for the fashion_det detectors (128x128 canvases, ResNet-18 from scratch, batch 8):
# SGD with linear warm-up, 6 epochs, step decay after epochs 4 and 5, gradient clipping because the
# backbone starts from random weights (no pretrained checkpoint may be downloaded).
max_epochs = 6
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=300),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[4, 5], gamma=0.1),
]
auto_scale_lr = dict(enable=False, base_batch_size=8)
