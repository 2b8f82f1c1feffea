# ResNet-18 on Fashion-MNIST, post-training quantized by min-max calibration at W4A8:
#   python tools/test.py configs/resnet18_fashionmnist_minmax_w4a8.py FLOAT.pth
_base_ = ['./resnet18_fashionmnist.py', './_base_/quant/minmax_w4a8.py']
test_cfg = dict(type='PTQLoop')
