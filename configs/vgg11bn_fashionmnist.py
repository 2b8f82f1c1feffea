# Stock mmpretrain VGG-11-BN convolutional body on Fashion-MNIST.
# Two adaptations to 28x28 grey images, both outside the convolutional body:
# - mmpretrain's VGG stem is hard-wired to 3 input channels, so the grey image is repeated
#   three times (RepeatChannels) instead of editing the backbone;
# - the stock 4096-wide classifier expects 224x224 inputs (7x7x512 features); at 28x28 the body
#   ends at 1x1x512 once the last max-pool is dropped, so it feeds a pooled linear 10-way head.
_base_ = [
    'mmpretrain::_base_/models/vgg11bn.py',
    './_base_/datasets/fashion_mnist_3ch.py',
    './_base_/schedules/fashion_mnist_cpu.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)

model = dict(
    backbone=dict(num_classes=-1, with_last_pool=False, out_indices=(4, )),
    neck=dict(_delete_=True, type='GlobalAveragePooling'),
    head=dict(_delete_=True, type='LinearClsHead', num_classes=10, in_channels=512,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, )))
optim_wrapper = dict(optimizer=dict(lr=0.05))
# 4 epochs instead of the shared schedule's 8: one VGG-11-BN epoch costs about 11 min on one core
# here (1.4 s per batch of 128), and the PTQ comparisons need a trained model, not the last 0.5 point
max_epochs = 4
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
