# Stock mmpretrain RegNetX-400MF on Fashion-MNIST (grouped 3x3 convs in ResNeXt-style bottlenecks),
# for the PTQ tables and the integer export. Only the input channels (grey images) and the number of
# classes change; the 8-epoch CPU schedule of ./resnet18_fashionmnist.py.
#   python tools/train.py configs/regnetx-400mf_fashionmnist.py
_base_ = [
    'mmpretrain::_base_/models/regnet/regnetx_400mf.py',
    './_base_/datasets/fashion_mnist.py',
    './_base_/schedules/fashion_mnist_cpu.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)

model = dict(backbone=dict(in_channels=1), head=dict(num_classes=10, topk=(1, )))
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
randomness = dict(seed=0, deterministic=False)
