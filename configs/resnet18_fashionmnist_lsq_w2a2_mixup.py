# ResNet-18 on Fashion-MNIST, lsq quantization-aware training at W2A2 with mixup (Zhang et al.,
# "mixup: Beyond Empirical Risk Minimization", ICLR 2018; QTool's --mixup_enable): each training
# batch is mixed with a shuffled copy of itself, lam ~ Beta(alpha, alpha), through mmpretrain's
# batch augments in the data preprocessor; the targets become the mixed one-hot scores, so the head
# takes the soft cross-entropy. alpha = 0.2 as the paper's ImageNet runs (QTool's default is 0.7).
#   python tools/train.py configs/resnet18_fashionmnist_lsq_w2a2_mixup.py
# Mixup works with every QAT recipe (and with quant.distill): copy the `model` lines below.
_base_ = ['./resnet18_fashionmnist_lsq_w2a2.py']

model = dict(
    head=dict(loss=dict(type='CrossEntropyLoss', loss_weight=1.0, use_soft=True)),
    train_cfg=dict(augments=dict(type='Mixup', alpha=0.2)))
