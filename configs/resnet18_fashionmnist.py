# Stock mmpretrain ResNet-18 (only the input channels and the number of classes changed),
# trained from scratch on Fashion-MNIST on the CPU.
_base_ = [
    'mmpretrain::_base_/models/resnet18.py',
    './_base_/datasets/fashion_mnist.py',
    './_base_/schedules/fashion_mnist_cpu.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)

model = dict(
    backbone=dict(in_channels=1),
    head=dict(num_classes=10, topk=(1, )))
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
randomness = dict(seed=0, deterministic=False)
