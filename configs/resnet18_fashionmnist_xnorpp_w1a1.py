# ResNet-18 on Fashion-MNIST, xnorpp binary training (W1A1) from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_xnorpp_w1a1.py
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/xnorpp_w1a1.py']
