# ResNet-18 on Fashion-MNIST, groupnet binary training (W1A1) from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_groupnet_w1a1.py
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/groupnet_w1a1.py']
