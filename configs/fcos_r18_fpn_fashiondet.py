# mmdet's FCOS with a ResNet-18 + FPN trained from scratch on the local fashion_det set
# (tools/make_detection_set.py) on the CPU.
_base_ = ['./_base_/models/fcos_r18_fpn.py', './_base_/fashion_det_cpu.py']

# the stock FCOS optimizer settings: lr 0.01, biases at twice the lr and without decay
optim_wrapper = dict(
    optimizer=dict(lr=0.01),
    paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.))
# boxes only: no segm AP
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
