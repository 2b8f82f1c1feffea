# Fashion-MNIST for stock backbones whose stem is hard-wired to 3 input channels (mmpretrain's VGG,
# MobileNetV2): the grey image is repeated three times (RepeatChannels) instead of editing the backbone.
_base_ = ['./fashion_mnist.py']

data_preprocessor = dict(mean=[72.94] * 3, std=[90.02] * 3)
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RepeatChannels'),
    dict(type='PackInputs'),
]))
val_dataloader = dict(dataset=dict(pipeline=[dict(type='RepeatChannels'), dict(type='PackInputs')]))
test_dataloader = val_dataloader
