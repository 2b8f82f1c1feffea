# The quantization-aware fine-tune shared by every resnet18_fashionmnist_{method}_w{W}a{A}.py:
# the float ResNet-18 (python tools/train.py configs/resnet18_fashionmnist.py, or the quickstart)
# fine-tuned with fake quantization for 1 epoch: SGD lr 0.01, 50-iteration warm-up, cosine to 0.
# More epochs: --cfg-options train_cfg.max_epochs=N param_scheduler.1.T_max=N param_scheduler.1.end=N
_base_ = ['./resnet18_fashionmnist.py']
load_from = 'work_dirs/resnet18_fashionmnist/epoch_8.pth'

max_epochs = 1
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs,
         eta_min=0.0, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
