# What every fashion_det detector recipe shares: the data, the CPU schedule, mmdet's runtime,
# mmquant's registrations, one checkpoint per epoch (the last kept) and the seed.
_base_ = [
    './datasets/fashion_det.py',
    './schedules/fashion_det_cpu.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
randomness = dict(seed=0)
