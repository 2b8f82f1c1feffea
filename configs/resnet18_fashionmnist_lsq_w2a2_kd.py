# ResNet-18 on Fashion-MNIST, lsq quantization-aware training at W2A2 from the float checkpoint,
# with knowledge distillation from the float model (Apprentice, Mishra & Marr, ICLR 2018): the
# training loss adds loss_kd = weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
#   python tools/train.py configs/resnet18_fashionmnist_lsq_w2a2_kd.py
# Evaluating what it writes needs no teacher: tools/test.py CONFIG work_dirs/.../epoch_1.pth
_base_ = ['./resnet18_fashionmnist_lsq_w2a2.py']
# the teacher's checkpoint is the float recipe's output (python tools/train.py
# configs/resnet18_fashionmnist.py), the same file the QAT run starts from (load_from)
quant = dict(distill=dict(checkpoint='work_dirs/resnet18_fashionmnist/epoch_8.pth', weight=1.0, temperature=4.0))
