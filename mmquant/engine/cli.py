"""What tools/train.py and tools/test.py share: the common flags, config loading, the
quantization flags and checkpoint peeking."""
import os
import os.path as osp
import sys

import torch
from mmengine.config import Config, DictAction

from ..ptq import PTQ_METHODS, check_method
from ..qat import QAT_METHODS, check_qat_method, qat_qconfig
from ..qconfig import parse_bits
from .distill import check_distill


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
    if train:
        what = (f'quantization-aware training method: one of {", ".join(sorted(QAT_METHODS))}, or '
                f'plain straight-through fake-quant initialised by {", ".join(sorted(PTQ_METHODS))}')
    else:
        what = f'post-training quantization method: one of {", ".join(sorted(PTQ_METHODS))}'
    parser.add_argument('--quant', metavar='NAME', help=what)
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
    train = not hasattr(args, 'calib_images')
    try:
        if args.quant is not None:
            if train and args.quant not in PTQ_METHODS and args.quant not in QAT_METHODS:
                raise ValueError(f'unknown quantization method {args.quant!r}; accepted for training: '
                                 f'{", ".join(sorted(QAT_METHODS))} (QAT), '
                                 f'{", ".join(sorted(PTQ_METHODS))} (straight-through init)')
            if not train:
                check_method(args.quant)
        if args.quant_bits is not None:
            parse_bits(args.quant_bits, binary=train and args.quant in QAT_METHODS)
            if args.quant is None:
                fail('--quant-bits needs --quant NAME')
    except ValueError as e:
        fail(str(e))


def check_file(path: str, what: str):
    if not osp.isfile(path):
        fail(f'{what} {path!r} does not exist')


def quant_meta(checkpoint: str, key: str = 'mmquant'):
    """The ``mmquant`` meta of a PTQ-quantized checkpoint (``key='mmquant_qat'``: of a QAT
    checkpoint), or ``None`` for a float one."""
    if not osp.isfile(checkpoint):
        return None
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    return (ckpt.get('meta') or {}).get(key) if isinstance(ckpt, dict) else None


# parameters of the trained quantizers, by name: their weight decay (the papers': no decay on
# LSQ steps and learned scales, L2 on PACT's clip level)
QUANT_PARAM_DECAY = {'quantizer.step': 0.0, 'quantizer.gamma': 0.0, '.lambdas': 0.0, 'quantizer.alpha': 1.0}
_QAT_KEYS = {'method', 'bits', 'qconfig', 'branches', 'calib_batches', 'alpha_decay_mult',
             'first_layers', 'last_layers', 'distill', 'fold_clip'}


def quant_from_qat_meta(meta: dict) -> dict:
    """The ``quant`` config dict that rebuilds the model a QAT checkpoint's meta describes (its
    ``distill`` settings, if any, are left out: the teacher only shaped the training loss)."""
    quant = {k: meta[k] for k in ('method', 'bits', 'qconfig', 'branches', 'first_layers', 'last_layers')}
    if meta.get('fold_clip'):
        quant['fold_clip'] = True
    return quant


def is_qat_config(cfg) -> bool:
    return (cfg.get('quant') or {}).get('method') in QAT_METHODS


def apply_qat(cfg, method=None, bits=None):
    """Turn ``cfg`` into a QAT config: the model becomes a ``QuantizedModel`` of the method
    (settings from ``cfg.quant``, overridden by ``method`` / ``bits``; ``quant.distill`` adds
    knowledge distillation from the float model), the calibration hook initialises the
    quantizers, and the quantizers' parameters get their weight decay."""
    quant = dict(cfg.get('quant') or {})
    unknown = set(quant) - _QAT_KEYS
    if unknown:
        raise ValueError(f'quant has unknown keys {sorted(unknown)} for a QAT method; accepted: {sorted(_QAT_KEYS)}')
    method = method or quant.get('method')
    check_qat_method(method)
    bits = bits or quant.get('bits') or 'w8a8'
    qat_qconfig(method, bits, quant.get('qconfig'))   # bits / qconfig errors now, not inside the Runner
    model = dict(type='QuantizedModel', architecture=cfg.model, method=method, bits=bits,
                 qconfig=quant.get('qconfig'), branches=quant.get('branches', 5))
    for key in ('first_layers', 'last_layers'):
        if quant.get(key) is not None:
            model[key] = list(quant[key])
    if quant.get('fold_clip'):
        model['fold_clip'] = True
    if quant.get('distill') is not None:        # knowledge distillation from the float model
        model['distill'] = check_distill(quant['distill'])
    cfg.model = model
    cfg.quant = dict(quant, method=method, bits=bits)
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'QuantCalibrationHook']
    cfg.custom_hooks = hooks + [dict(type='QuantCalibrationHook', num_batches=quant.get('calib_batches', 8))]
    if cfg.get('optim_wrapper') is not None:
        paramwise = dict(cfg.optim_wrapper.get('paramwise_cfg') or {})
        keys = dict(paramwise.get('custom_keys') or {})
        for key, decay in QUANT_PARAM_DECAY.items():
            if key == 'quantizer.alpha':
                decay = quant.get('alpha_decay_mult', decay)
            keys.setdefault(key, dict(decay_mult=decay))
        paramwise['custom_keys'] = keys
        cfg.optim_wrapper.paramwise_cfg = paramwise
    return cfg


def ptq_test_cfg(cfg, args):
    """The ``PTQLoop`` settings from the flags, the config's ``test_cfg`` or the checkpoint's meta."""
    meta = quant_meta(args.checkpoint)
    loop = dict(cfg.get('test_cfg') or {})
    if getattr(args, 'quant', None) is not None:
        loop = dict(type='PTQLoop', method=args.quant, bits=args.quant_bits or 'w8a8',
                    qconfig=loop.get('qconfig') if loop.get('type') == 'PTQLoop' else None)
    elif meta is not None:
        loop = dict(type='PTQLoop', method=meta['method'], bits=meta['bits'])
    elif cfg.get('quant'):
        loop = dict(type='PTQLoop')
    if loop.get('type') != 'PTQLoop':
        return None
    if meta is not None:
        if getattr(args, 'quant', None) is not None and (meta['method'], meta['bits']) != (loop['method'], loop['bits']):
            fail(f'{args.checkpoint} was quantized by {meta["method"]} at {meta["bits"]}, not '
                 f'{loop["method"]} at {loop.get("bits")}; drop --quant to evaluate it as it is')
        loop.update(qconfig=meta['qconfig'], first_layers=meta['first_layers'],
                    last_layers=meta['last_layers'])
        # rebuild the model the quantizers were calibrated on
        # (quant_residual only where set: the methods without that option never set it)
        options = {'fold_bn': meta['fold_bn']} if 'fold_bn' in meta else {}
        if meta.get('quant_residual'):
            options['quant_residual'] = True
        if options:
            loop['options'] = options
    if getattr(args, 'calib_images', None) is not None:
        loop['calib_images'] = args.calib_images
    return loop
