# ResNet-18 on Fashion-MNIST, F8Net quantization-aware training at W8A8 from the float checkpoint:
#   python tools/train.py configs/resnet18_fashionmnist_f8net_w8a8.py
# Post-training instead (F8Net's "tiny fine-tune": statistics only, no gradient steps):
#   python tools/test.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/epoch_8.pth --quant f8net
_base_ = ['./resnet18_fashionmnist_qat.py', './_base_/quant/f8net_w8a8.py']
