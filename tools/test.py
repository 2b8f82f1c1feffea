"""Test an mmpretrain / mmdet model, optionally after post-training quantization.

    python tools/test.py CONFIG CHECKPOINT                         # float, or a quantized checkpoint
    python tools/test.py CONFIG CHECKPOINT --quant minmax --quant-bits w4a8
"""
import argparse
import json
import os
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401  (registers entry points, allow-lists checkpoint classes)
from mmquant.engine.cpu_ddp import setup_cpu_distributed  # noqa: E402
from mmquant.engine.cli import (add_common_args, apply_qat, check_file, fail, is_qat_config,  # noqa: E402
                                load_config, ptq_test_cfg, quant_from_qat_meta, quant_meta)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and post-training quantize) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (float, or quantized by mmquant)')
    parser.add_argument('--out-metrics', help='also write the metrics to this JSON file')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision testing')
    add_common_args(parser, train=False)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    try:
        setup_cpu_distributed(cfg)
    except ValueError as e:
        fail(str(e))
    check_file(args.checkpoint, 'checkpoint')
    qat = quant_meta(args.checkpoint, 'mmquant_qat')
    if qat is None and args.quant is None and is_qat_config(cfg):
        fail(f'{args.checkpoint} is not a quantization-aware-trained checkpoint of {cfg.quant["method"]}: '
             f'train it first (tools/train.py {args.config}) and test what that writes')
    if qat is not None:
        # a quantization-aware-trained model: rebuild it as trained, its checkpoint holds the rest
        if args.quant is not None:
            fail(f'{args.checkpoint} was trained with {qat["method"]} at {qat["bits"]}; drop --quant '
                 'to evaluate it')
        cfg.quant = quant_from_qat_meta(qat)
        try:
            apply_qat(cfg)
        except ValueError as e:
            fail(str(e))
        cfg.test_cfg = dict(cfg.test_cfg) if cfg.get('test_cfg', {}).get('type') != 'PTQLoop' else dict()
    loop = None if qat is not None else ptq_test_cfg(cfg, args)
    if loop is not None:
        cfg.test_cfg = loop
    if args.amp:
        cfg.test_cfg = dict(cfg.get('test_cfg') or {}, fp16=True)
    cfg.load_from = args.checkpoint

    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    result = dict(config=args.config, checkpoint=args.checkpoint, metrics=metrics)
    if loop is not None:
        tl = runner.test_loop
        result.update(method=tl.method.name, bits=tl.method.qconfig.bits_tag(),
                      calib_seconds=getattr(tl, 'calib_seconds', None),
                      quantized_checkpoint=getattr(tl, 'checkpoint_path', None))
    if args.out_metrics:
        tmp = args.out_metrics + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=2, default=float)
        os.replace(tmp, args.out_metrics)
    return result


if __name__ == '__main__':
    main()
