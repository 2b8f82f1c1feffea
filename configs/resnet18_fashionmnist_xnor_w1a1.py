# ResNet-18 on Fashion-MNIST, xnor binary training (W1A1) from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_xnor_w1a1.py
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/xnor_w1a1.py']
