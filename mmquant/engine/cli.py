"""What tools/train.py and tools/test.py share: the common flags, config loading, the
quantization flags and checkpoint peeking."""
import os
import os.path as osp
import sys

import torch
from mmengine.config import Config, DictAction

from ..ptq import PTQ_METHODS, check_method
from ..qconfig import parse_bits


def add_common_args(parser, train: bool):
    """``--work-dir``, ``--cfg-options``, ``--launcher``, ``--local-rank`` and the quant flags."""
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and metrics '
                        '(default ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_cfg.max_epochs=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    add_quant_args(parser, train)


def load_config(args) -> Config:
    """Validate the flags (one-line errors), then load the config with the flags applied."""
    check_quant_args(args)
    check_file(args.config, 'config')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def add_quant_args(parser, train: bool):
    what = ('observers that initialise fake-quant training' if train else 'post-training method')
    parser.add_argument('--quant', metavar='NAME',
                        help=f'quantization {what}: one of {", ".join(sorted(PTQ_METHODS))}')
    parser.add_argument('--quant-bits', metavar='wNaM',
                        help="bits, e.g. 'w4a8', or 'w3' for weight-only (default 'w8a8')")
    if not train:
        parser.add_argument('--calib-images', type=int, metavar='N',
                            help='calibration images from the train set (default 1024; 64 for mmdet)')


def fail(msg: str):
    """One clear line on stderr and a non-zero exit."""
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def check_quant_args(args):
    """Validate ``--quant`` / ``--quant-bits`` before anything heavy is built."""
    try:
        if args.quant is not None:
            check_method(args.quant)
        if args.quant_bits is not None:
            parse_bits(args.quant_bits)
            if args.quant is None:
                fail('--quant-bits needs --quant NAME')
    except ValueError as e:
        fail(str(e))


def check_file(path: str, what: str):
    if not osp.isfile(path):
        fail(f'{what} {path!r} does not exist')


def quant_meta(checkpoint: str):
    """The ``mmquant`` meta of a quantized checkpoint, or ``None`` for a float one."""
    if not osp.isfile(checkpoint):
        return None
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    return (ckpt.get('meta') or {}).get('mmquant') if isinstance(ckpt, dict) else None
