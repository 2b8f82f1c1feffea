"""Train an mmpretrain / mmdet model, optionally with fake quantization (straight-through).

    python tools/train.py configs/resnet18_fashionmnist.py
    python tools/train.py CONFIG --quant minmax --quant-bits w4a4 --cfg-options load_from=float.pth
"""
import argparse
import os
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401  (registers entry points, allow-lists checkpoint classes)
from mmquant.engine.cli import add_quant_args, check_file, check_quant_args  # noqa: E402
from mmquant.ptq import build_ptq  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (optionally quantization-aware)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or the latest one in work_dir if none given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale lr by the batch size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_cfg.max_epochs=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_quant_args(parser, train=True)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def wrap_for_qat(cfg, method: str, bits: str):
    """Swap the layers at build time and calibrate them on a few batches before training."""
    ptq = build_ptq(method, cfg.get('qconfig'), bits)
    cfg.model = dict(type='QuantizedModel', architecture=cfg.model, qconfig=ptq.qconfig.to_dict())
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'QuantCalibrationHook']
    cfg.custom_hooks = hooks + [dict(type='QuantCalibrationHook', num_batches=8)]


def main(argv=None):
    args = parse_args(argv)
    check_quant_args(args)
    check_file(args.config, 'config')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    if args.quant is not None:
        wrap_for_qat(cfg, args.quant, args.quant_bits or 'w8a8')
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
