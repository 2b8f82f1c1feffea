"""The main job: train (or reuse) a float classifier on Fashion-MNIST, quantize it at several bit
widths, and print a table of top-1 accuracy for FP and each quantized setting.

    python tools/quickstart.py                                   # ResNet-18, minmax, W8A8 W4A8 W4A4 W3
    python tools/quickstart.py --methods minmax,mse,kl --bits w4a4,w3
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FMNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/resnet18_fashionmnist.py')
    p.add_argument('--methods', default='minmax', help='comma-separated PTQ methods')
    p.add_argument('--bits', default='w8a8,w4a8,w4a4,w3', help='comma-separated bit settings')
    p.add_argument('--work-dir', default=None, help='default work_dirs/<config name>')
    p.add_argument('--data-root', default=osp.join(ROOT, 'data', 'fashion_mnist'))
    return p.parse_args()


def run(cmd):
    print('+ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def float_checkpoint(config, work_dir):
    """The last checkpoint of the float training in ``work_dir``, training first if there is none."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        run([sys.executable, 'tools/train.py', config, '--work-dir', work_dir])
    with open(pointer) as f:
        return f.read().strip()


def evaluate(config, ckpt, out_dir, extra=()):
    os.makedirs(out_dir, exist_ok=True)
    out = osp.join(out_dir, 'metrics.json')
    t0 = time.perf_counter()
    run([sys.executable, 'tools/test.py', config, ckpt, '--work-dir', out_dir, '--out-metrics', out, *extra])
    with open(out) as f:
        result = json.load(f)
    result['wall_seconds'] = time.perf_counter() - t0
    return result


def top1(result):
    return next(v for k, v in result['metrics'].items() if k.endswith('top1'))


def main():
    args = parse_args()
    missing = [f for f in FMNIST_FILES if not osp.isfile(osp.join(args.data_root, f))]
    if missing:
        sys.exit(f'error: Fashion-MNIST not found in {args.data_root} (missing {", ".join(missing)}); '
                 f'run scripts/install.sh, which installs dataset-fashion-mnist and unpacks it there')
    name = osp.splitext(osp.basename(args.config))[0]
    work_dir = args.work_dir or osp.join(ROOT, 'work_dirs', name)
    ckpt = float_checkpoint(args.config, work_dir)
    rows = [('FP32', '-', evaluate(args.config, ckpt, osp.join(work_dir, 'eval_fp32')))]
    for method in args.methods.split(','):
        for bits in args.bits.split(','):
            res = evaluate(args.config, ckpt, osp.join(work_dir, f'{method}_{bits}'),
                           ['--quant', method, '--quant-bits', bits])
            rows.append((bits.upper(), method, res))
    fp = top1(rows[0][2])
    lines = [f'{name} on Fashion-MNIST test set (10,000 images), float checkpoint {osp.relpath(ckpt, ROOT)}',
             '', '| setting | method | top-1 (%) | vs FP | calibration (s) |', '|---|---|---|---|---|']
    for setting, method, res in rows:
        acc = top1(res)
        calib = res.get('calib_seconds')
        lines.append(f'| {setting} | {method} | {acc:.2f} | {acc - fp:+.2f} | '
                     f'{"-" if calib is None else f"{calib:.1f}"} |')
    table = '\n'.join(lines)
    print('\n' + table)
    out = osp.join(work_dir, 'quickstart_results.md')
    with open(out + '.tmp', 'w') as f:
        f.write(table + '\n')
    os.replace(out + '.tmp', out)
    print(f'\n(written to {osp.relpath(out, ROOT)})')


if __name__ == '__main__':
    main()
