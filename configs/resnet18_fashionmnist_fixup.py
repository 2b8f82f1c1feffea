# ResNet-18 without normalisation layers, Fixup-initialised (Zhang, Dauphin, Ma, "Fixup
# Initialization: Residual Learning Without Normalization", ICLR 2019): scalar biases around the
# convs, a scalar multiplier per branch, branch-final convs and the classifier zeroed, the other
# branch convs He-scaled by L^-1/2 (mmquant/models/ordered_resnet.py); trained from scratch on
# Fashion-MNIST like ./resnet18_fashionmnist.py:
#   python tools/train.py configs/resnet18_fashionmnist_fixup.py
# Schedule: ./_base_/schedules/fashion_mnist_cpu.py's (SGD + Nesterov, lr 0.1 at batch 128, 200
# iterations of linear warm-up, cosine), kept: the paper trains Fixup ResNets at the same learning
# rate as their BatchNorm counterparts (0.1 at batch 128 on CIFAR-10), and a probe here (this
# model, optimizer and warm-up in a plain loop, 300 iterations at batch 128, the last 100 at the
# full 0.1) trained stably: mean training loss 2.10 over the first 25 iterations, 0.37 over the
# last 25, no spikes. So no lower rate. As the authors' released code does, the scalar biases and
# multipliers learn at a tenth of the rate (custom_keys below).
_base_ = ['./resnet18_fashionmnist.py']

model = dict(
    backbone=dict(type='OrderedResNet', fixup=True),
    # Fixup zeroes the classifier: weight and bias 0 (mmpretrain's default is Normal(std=0.01))
    head=dict(init_cfg=dict(type='Constant', layer='Linear', val=0, bias=0)))
_scalars = dict(lr_mult=0.1)
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'bias1a': _scalars, 'bias1b': _scalars, 'bias2a': _scalars, 'bias2b': _scalars,
        'stem_bias': _scalars, '.scale': _scalars,
    }))
