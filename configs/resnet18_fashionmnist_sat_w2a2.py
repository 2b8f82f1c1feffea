# ResNet-18 on Fashion-MNIST, sat quantization-aware training at W2A2 from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_sat_w2a2.py
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/sat_w2a2.py']
