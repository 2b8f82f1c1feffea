# ResNet-18 with the TResNet stem (Ridnik et al., "TResNet: High Performance GPU-Dedicated
# Architecture", WACV 2021): SpaceToDepth then one 3x3 stride-1 conv, BN, ReLU, no max-pool, in place
# of the 7x7 stride-2 conv, BN, ReLU and 3x3 max-pool; trained from scratch on Fashion-MNIST like
# ./resnet18_fashionmnist.py:
#   python tools/train.py configs/resnet18_fashionmnist_tresnet_stem.py
# space_to_depth=2 (the paper's 4 is for 224x224 inputs): 28x28 -> 4 channels of 14x14, the size the
# normal stem's stride-2 conv gives before its max-pool. Without that max-pool the stages run at
# 14, 7, 4, 2 instead of 7, 4, 2, 1, about 4x the compute of ./resnet18_fashionmnist.py (on the CPU,
# expect an 8-epoch run to take correspondingly longer); space_to_depth=4 gives the normal 7x7 first stage.
# Any block order combines with it (order='bacs' | 'cabs'), and so does fixup=True
# (mmquant/models/ordered_resnet.py).
_base_ = ['./resnet18_fashionmnist.py']

model = dict(backbone=dict(type='OrderedResNet', stem='tresnet', space_to_depth=2))
