"""Train an mmpretrain / mmdet model, optionally with fake quantization (straight-through).

    python tools/train.py configs/resnet18_fashionmnist.py
    python tools/train.py configs/resnet18_fashionmnist_lsq_w4a4.py      # QAT from its float checkpoint
    python tools/train.py CONFIG --quant lsq --quant-bits w2a2 --cfg-options load_from=float.pth
    python tools/train.py CONFIG --quant minmax --quant-bits w4a4 --cfg-options load_from=float.pth
"""
import argparse
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401  (registers entry points, allow-lists checkpoint classes)
from mmquant.engine.cpu_ddp import setup_cpu_distributed  # noqa: E402
from mmquant.engine.distill import check_distill  # noqa: E402
from mmquant.engine.cli import add_common_args, apply_qat, fail, is_qat_config, load_config  # noqa: E402
from mmquant.ptq import build_ptq  # noqa: E402
from mmquant.qat import QAT_METHODS  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (optionally with fake quantization)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or the latest one in work_dir if none given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale lr by the batch size')
    add_common_args(parser, train=True)
    return parser.parse_args(argv)


def wrap_for_qat(cfg, method: str, bits: str):
    """Swap the layers at build time and calibrate them on a few batches before training; the
    config's ``quant.qconfig`` (a scheme's) refines the layers."""
    ptq = build_ptq(method, (cfg.get('quant') or {}).get('qconfig'), bits)
    cfg.model = dict(type='QuantizedModel', architecture=cfg.model, qconfig=ptq.qconfig.to_dict())
    distill = (cfg.get('quant') or {}).get('distill')
    if distill is not None:                # knowledge distillation from the float model
        cfg.model['distill'] = check_distill(distill)
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'QuantCalibrationHook']
    cfg.custom_hooks = hooks + [dict(type='QuantCalibrationHook', num_batches=8)]


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    try:
        setup_cpu_distributed(cfg)
    except ValueError as e:
        fail(str(e))
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    try:
        if args.quant in QAT_METHODS or (args.quant is None and is_qat_config(cfg)):
            apply_qat(cfg, args.quant, args.quant_bits)
        elif args.quant is not None:
            wrap_for_qat(cfg, args.quant, args.quant_bits or 'w8a8')
    except ValueError as e:
        fail(str(e))
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
