# Stock mmpretrain MobileNetV2 (1.0x) on Fashion-MNIST: depthwise convs and inverted residuals
# for the PTQ tables and the integer export. As for VGG, the grey image is repeated to the three
# channels the stem is hard-wired to (RepeatChannels); the stock 1280-wide head gets 10 classes.
# At 28x28 the body's five stride-2 stages end at 1x1, which the global pooling neck takes as is.
_base_ = [
    'mmpretrain::_base_/models/mobilenet_v2_1x.py',
    './_base_/datasets/fashion_mnist_3ch.py',
    './_base_/schedules/fashion_mnist_cpu.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)

model = dict(head=dict(num_classes=10, topk=(1, )))
optim_wrapper = dict(optimizer=dict(lr=0.05, weight_decay=4e-5))
max_epochs = 6
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs,
         eta_min=1e-4, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
randomness = dict(seed=0, deterministic=False)
