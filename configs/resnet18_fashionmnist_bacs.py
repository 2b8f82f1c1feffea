# Pre-activation ResNet-18 (BN-ReLU-conv, then the sum; BN-ReLU before pooling: He et al., ECCV 2016
# "Identity Mappings in Deep Residual Networks"), QTool's 'bacs' block order, trained from scratch on
# Fashion-MNIST like ./resnet18_fashionmnist.py:
#   python tools/train.py configs/resnet18_fashionmnist_bacs.py
# Other orders / shortcuts (mmquant/models/ordered_resnet.py): order='cbsa' | 'cabs',
# downsample='avgpool_conv'. Float shortcut convs when quantizing: quant.qconfig.skip=['*downsample*'].
_base_ = ['./resnet18_fashionmnist.py']

model = dict(backbone=dict(type='OrderedResNet', order='bacs'))
