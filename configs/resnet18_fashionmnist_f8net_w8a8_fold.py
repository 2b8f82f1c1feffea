# ResNet-18 on Fashion-MNIST, F8Net QAT at W8A8 with PACT's clipping levels folded into the weights
# of the layers that produce the clipped inputs (the paper's form): the integer export then
# rescales between layers by shifts only.
#   python tools/train.py configs/resnet18_fashionmnist_f8net_w8a8_fold.py
#   python tools/export.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist_f8net_w8a8_fold/epoch_1.pth --format int --out r18_f8net_fold_int.onnx
_base_ = ['./resnet18_fashionmnist_f8net_w8a8.py']
quant = dict(fold_clip=True)
