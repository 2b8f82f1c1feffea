"""Time mmquant's BRECQ against the authors' published implementation on the same model and data.

Both quantize the same float Fashion-MNIST ResNet-18 (mmpretrain's, from a config and checkpoint;
the reference gets an identical copy in its own ResNet class, checked to give the same logits) on
the same calibration images, at the same bits, batch 32, lambda 0.01, warm-up 0.2, beta 20 -> 2,
per-channel weight grids from an Lp search, first and last layer 8-bit, one thread each, one after
the other in the same process. The table gives, per reconstruction unit, the wall time, the
iterations and the time per iteration of each, the totals, and the top-1 of both models on the
whole test set, so speed is compared at equal accuracy.

    python benchmarks/brecq_vs_reference.py configs/resnet18_fashionmnist.py \\
        work_dirs/resnet18_fashionmnist/epoch_8.pth --reference /path/to/BRECQ --bits w2a4 --iters 2000

The reference is not vendored and never downloaded: pass a local checkout of
https://github.com/yhhhli/BRECQ (tested at e455d62). Its ``quant`` package is imported from there
and called unchanged but for one line needed on a CPU: ``quant/block_recon.py`` line 82 hard-codes
``device = 'cuda'`` for the minibatches; set it to ``device = next(block.parameters()).device``
(its ``torch.cuda.empty_cache()`` calls are no-ops without CUDA).

How each runs (their main_imagenet.py's procedure, driven from here through their public
functions): the reference learns the weight rounding first (``iters`` iterations per unit,
activations float), then, with activations quantized, learns the activation steps
(``iters // 4`` iterations per unit, lr 4e-4, p = 2.4: their 20000 / 5000 ratio and defaults).
mmquant learns both jointly in ``iters`` iterations per unit (``early_stop`` off here unless
``--early-stop``, so both run every iteration asked). Weight-only settings (``--bits w2``) make
the two procedures identical in iteration count. Nothing is written except ``--out`` (JSON,
atomically).
"""
import argparse
import copy
import json
import logging
import os
import os.path as osp
import sys
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mmquant.engine.cli import check_file, fail  # noqa: E402

REF_URL = 'https://github.com/yhhhli/BRECQ'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint (mmpretrain ResNet-18)')
    p.add_argument('--reference', required=True, metavar='DIR',
                   help=f"local checkout of the authors' code (git clone {REF_URL} DIR)")
    p.add_argument('--bits', default='w2a4', help='w{W} or w{W}a{A} (default w2a4)')
    p.add_argument('--iters', type=int, default=2000, help='weight-rounding iterations per unit (default 2000)')
    p.add_argument('--calib-images', type=int, default=1024)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--early-stop', action='store_true', help="let mmquant stop a unit once its rounding is settled")
    p.add_argument('--skip', choices=['ours', 'reference'], default=None, help='run only the other one')
    p.add_argument('--out', help='write the table as JSON')
    args = p.parse_args(argv)
    if args.iters < 4 or args.calib_images < 32 or args.threads < 1:
        p.error('--iters must be >= 4, --calib-images >= 32, --threads >= 1')
    return args


def load_reference(root: str):
    """The reference's ``quant`` package and ResNet classes from a local checkout."""
    if not osp.isfile(osp.join(root, 'quant', 'block_recon.py')):
        fail(f'{root!r} is not a checkout of the authors\' code (no quant/block_recon.py): '
             f'git clone {REF_URL} {root}')
    sys.path.insert(0, osp.abspath(root))
    import quant as ref_quant  # noqa: E402
    from models import resnet as ref_resnet  # noqa: E402
    return ref_quant, ref_resnet


def reference_copy(model: nn.Module, ref_resnet) -> nn.Module:
    """The float mmpretrain ResNet-18 classifier as the reference's ``ResNet`` (same weights)."""
    bb = model.backbone
    net = ref_resnet.resnet18(num_classes=model.head.fc.out_features)
    net.conv1 = nn.Conv2d(bb.conv1.in_channels, 64, 7, 2, 3, bias=False)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith('backbone.'):
            state[k[len('backbone.'):]] = v
        elif k.startswith('head.fc.'):
            state['fc.' + k[len('head.fc.'):]] = v
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        fail(f'the checkpoint does not map onto the reference ResNet-18: missing {missing}, unexpected {unexpected}')
    return net.eval()


def top1(forward, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    right = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            right += int((forward(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    return 100.0 * right / len(images)


def run_reference(net: nn.Module, ref_quant, cali: torch.Tensor, w_bits: int, a_bits, iters: int):
    """Their procedure on ``net``: returns (quantized model, per-unit rows)."""
    wq = {'n_bits': w_bits, 'channel_wise': True, 'scale_method': 'mse'}
    aq = {'n_bits': a_bits or 8, 'channel_wise': False, 'scale_method': 'mse', 'leaf_param': bool(a_bits)}
    qnn = ref_quant.QuantModel(model=net, weight_quant_params=wq, act_quant_params=aq).eval()
    qnn.set_first_last_layer_to_8bit()
    qnn.set_quant_state(True, False)
    with torch.no_grad():
        qnn(cali[:64])
    units = []

    def walk(module, prefix):
        for name, child in module.named_children():
            path = f'{prefix}.{name}' if prefix else name
            if isinstance(child, ref_quant.QuantModule):
                units.append((path, child, ref_quant.layer_reconstruction))
            elif isinstance(child, ref_quant.BaseQuantBlock):
                units.append((path, child, ref_quant.block_reconstruction))
            else:
                walk(child, path)
    walk(qnn.model, '')
    rows = {}
    kw = dict(cali_data=cali, iters=iters, weight=0.01, asym=True, b_range=(20, 2), warmup=0.2,
              act_quant=False, opt_mode='mse')
    for path, unit, fn in units:
        if getattr(unit, 'ignore_reconstruction', False):
            continue
        t = time.perf_counter()
        fn(qnn, unit, **kw)
        rows[path] = dict(seconds=time.perf_counter() - t, iters=iters)
        print(f'reference weights {path}: {rows[path]["seconds"]:.1f} s', flush=True)
    if a_bits:
        qnn.set_quant_state(True, True)
        with torch.no_grad():
            qnn(cali[:64])
        qnn.disable_network_output_quantization()
        kw = dict(cali_data=cali, iters=iters // 4, act_quant=True, opt_mode='mse', lr=4e-4, p=2.4)
        for path, unit, fn in units:
            if getattr(unit, 'ignore_reconstruction', False) or path not in rows:
                continue
            t = time.perf_counter()
            fn(qnn, unit, **kw)
            rows[path]['seconds'] += time.perf_counter() - t
            rows[path]['iters'] += iters // 4
            print(f'reference activations {path}: {time.perf_counter() - t:.1f} s', flush=True)
    qnn.set_quant_state(True, bool(a_bits))
    return qnn, rows


def run_ours(model: nn.Module, cali: torch.Tensor, bits: str, iters: int, early_stop: bool, seed: int):
    from mmquant.ptq import build_ptq
    method = build_ptq('brecq', None, bits, iters=iters, early_stop=early_stop, seed=seed)
    fwd = lambda m, x: m(x, mode='tensor')                  # noqa: E731
    batches = list(cali.split(32))
    method.convert(model, lambda: fwd(model, batches[0]))
    records = method.calibrate(model, batches, fwd)
    rows = {r.name.replace('backbone.', '').replace('head.', ''): dict(seconds=r.seconds, iters=r.iters)
            for r in records if r.loss is not None}
    return model, rows


def main(argv=None):
    args = parse_args(argv)
    ref_quant, ref_resnet = (None, None) if args.skip == 'reference' else load_reference(args.reference)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    logging.getLogger('mmquant').setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.runner import Runner

    import mmquant  # noqa: F401
    from mmquant.engine.ptq_loop import _take_images, default_calib_dataloader
    from mmquant.qconfig import parse_bits
    check_file(args.config, 'config')
    check_file(args.checkpoint, 'checkpoint')
    w_bits, a_bits = parse_bits(args.bits)

    cfg = Config.fromfile(args.config)
    cfg.work_dir = osp.join('work_dirs', 'benchmarks', 'brecq_vs_reference')
    cfg.load_from = args.checkpoint
    cfg.default_hooks = dict()
    MMLogger.get_instance('mmengine', log_level='WARNING')
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()
    model = runner.model.eval()
    pre = lambda d: model.data_preprocessor(d, False)['inputs']   # noqa: E731
    torch.manual_seed(args.seed)
    calib, n = _take_images(runner.build_dataloader(default_calib_dataloader(runner, cfg.test_dataloader)),
                            args.calib_images)
    cali = torch.cat([pre(d) for d in calib])
    images, labels = [], []
    for d in runner.test_dataloader:
        images.append(pre(d))
        labels.append(torch.tensor([int(s.gt_label[0]) for s in d['data_samples']]))
    images, labels = torch.cat(images), torch.cat(labels)
    result = dict(bits=args.bits, iters=args.iters, calib_images=n, threads=args.threads,
                  fp=top1(lambda x: model(x, mode='tensor'), images, labels))
    print(f'float top-1 {result["fp"]:.2f} on {len(images)} test images; {n} calibration images', flush=True)

    if args.skip != 'reference':
        net = reference_copy(model, ref_resnet)
        with torch.no_grad():
            diff = float((net(images[:256]) - model(images[:256], mode='tensor')).abs().max())
        if diff > 1e-3:
            fail(f'the reference copy of the model differs from it (max |logit diff| {diff:.3g})')
        torch.manual_seed(args.seed)
        t = time.perf_counter()
        qnn, rows = run_reference(net, ref_quant, cali, w_bits, a_bits, args.iters)
        result['reference'] = dict(seconds=time.perf_counter() - t, units=rows,
                                   top1=top1(qnn, images, labels))
    if args.skip != 'ours':
        t = time.perf_counter()
        qm, rows = run_ours(copy.deepcopy(model), cali, args.bits, args.iters, args.early_stop, args.seed)
        result['ours'] = dict(seconds=time.perf_counter() - t, units=rows,
                              top1=top1(lambda x: qm(x, mode='tensor'), images, labels))
    print_table(result)
    if args.out:
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)


def print_table(r):
    cols = [k for k in ('reference', 'ours') if k in r]
    names = list(r[cols[-1]]['units']) + [n for n in r[cols[0]]['units'] if n not in r[cols[-1]]['units']]
    both = [n for n in names if all(n in r[c]['units'] for c in cols)]
    print(f"\nBRECQ {r['bits']}, {r['iters']} weight iterations per unit, {r['calib_images']} calibration images, "
          f"{r['threads']} thread(s); float top-1 {r['fp']:.2f}\n")
    head = '| unit | ' + ' | '.join(f'{c} s (iters, ms/iter)' for c in cols)
    print(head + (' | speed-up per iteration |' if len(cols) == 2 else ' |'))
    print('|---' * (len(cols) + 1 + (len(cols) == 2)) + '|')
    tot = {c: [0.0, 0] for c in cols}
    for name in names:
        cells = []
        per = {}
        for c in cols:
            u = r[c]['units'].get(name)
            if u is None:
                cells.append('-')
                continue
            per[c] = 1000 * u['seconds'] / max(u['iters'], 1)
            if name in both:
                tot[c][0] += u['seconds']
                tot[c][1] += u['iters']
            cells.append(f"{u['seconds']:.1f} ({u['iters']}, {per[c]:.1f})")
        sp = f" | {per['reference'] / per['ours']:.2f}x" if len(per) == 2 else (' | -' if len(cols) == 2 else '')
        print(f'| {name} | ' + ' | '.join(cells) + sp + ' |')
    cells = [f"{tot[c][0]:.1f} ({tot[c][1]}, {1000 * tot[c][0] / max(tot[c][1], 1):.1f})" for c in cols]
    sp = ''
    if len(cols) == 2:
        a, b = (1000 * tot[c][0] / max(tot[c][1], 1) for c in cols)
        sp = f' | {a / b:.2f}x'
    print(f'| the {len(both)} units {" and ".join(cols)} reconstruct | ' + ' | '.join(cells) + sp + ' |')
    print('| whole run (caching, init, units) | ' + ' | '.join(f"{r[c]['seconds']:.1f}" for c in cols)
          + (' | |' if len(cols) == 2 else ' |'))
    print('| top-1 (%) | ' + ' | '.join(f"{r[c]['top1']:.2f}" for c in cols) + (' | |' if len(cols) == 2 else ' |'))


if __name__ == '__main__':
    main()
