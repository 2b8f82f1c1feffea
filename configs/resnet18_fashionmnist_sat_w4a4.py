# ResNet-18 on Fashion-MNIST, sat quantization-aware training at W4A4 from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_sat_w4a4.py
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/sat_w4a4.py']
