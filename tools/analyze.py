"""Per-layer quantization sensitivity of an mmpretrain / mmdet model, and a mixed-precision suggestion.

    python tools/analyze.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/epoch_8.pth \\
        --quant-bits w3a8 --verify

Quantizes the float model with a PTQ method (``--quant``, default minmax) at ``--quant-bits``,
then for every quantized layer: that layer alone quantized, and every layer but it quantized;
output SQNR and cosine against the float model and, for classifiers, top-1 on ``--eval-images``
test images. Then each layer's output noise with only its weight at each of ``--candidates`` bits,
and the weight bits that minimise the summed noise at ``--avg-bits`` bits per weight on average
(default: the uniform width of ``--quant-bits``, i.e. the same size); first and last layers keep
their bits. Writes to ``--out-dir``: ``sensitivity.json``, ``sensitivity.png`` (bar chart) and
``mixed_<bits>.py``, a config that inherits CONFIG and carries the suggested bits as a qconfig
override (``tools/test.py mixed_<bits>.py CKPT`` quantizes and tests it). ``--verify`` also
quantizes the model both ways, uniform and suggested, and evaluates both on the whole test set.
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

import mmquant  # noqa: E402,F401  (registers entry points, allow-lists checkpoint classes)
from mmquant.analysis import float_outputs, layer_sensitivity, suggest_bits, weight_noise  # noqa: E402
from mmquant.convert import weight_bytes  # noqa: E402
from mmquant.engine.cli import check_file, fail  # noqa: E402
from mmquant.engine.progress import Progress  # noqa: E402
from mmquant.fileio import write_atomic, write_text_atomic  # noqa: E402
from mmquant.ptq import build_ptq, check_method  # noqa: E402
from mmquant.qconfig import parse_bits  # noqa: E402
from mmquant.quantizers.scheme import check_bits  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint')
    p.add_argument('--quant', default='minmax', help='PTQ method that calibrates the grids (default minmax)')
    p.add_argument('--quant-bits', default='w4a4', help='uniform setting analysed, e.g. w4a4 or w3 (default w4a4)')
    p.add_argument('--calib-images', type=int, default=256, help='calibration images from the train set (256)')
    p.add_argument('--eval-images', type=int, default=1000,
                   help='test images the layer views are measured on (1000)')
    p.add_argument('--candidates', default='2,3,4,8', help='weight bit widths to choose from (2,3,4,8)')
    p.add_argument('--avg-bits', type=float, default=None,
                   help='weight bits per weight on average over the searched layers (default: the '
                        'uniform width of --quant-bits)')
    p.add_argument('--verify', action='store_true',
                   help='quantize uniform and suggested, evaluate both on the whole test set')
    p.add_argument('--out-dir', default=None, help='default work_dirs/analyze/<config name>_<bits>')
    return p.parse_args(argv)


def top1(batches):
    """``metric_fn`` of a classifier: top-1 (%) of the logits against the batches' labels."""
    labels = [torch.tensor([int(s.gt_label[0]) for s in b['data_samples']]) for b in batches]

    def metric(outs):
        if outs[0].shape[1] < 2:
            return None
        right = sum(int((o.argmax(1) == y).sum()) for o, y in zip(outs, labels))
        return 100.0 * right / sum(len(y) for y in labels)
    return metric


def evaluate(model, loader, evaluator) -> dict:
    model.eval()
    with torch.no_grad():
        for data in loader:
            evaluator.process(data_samples=model.test_step(data), data_batch=data)
    return evaluator.evaluate(len(loader.dataset))


def quantize(float_model, method, bits, qconfig, batches, fwd):
    """A calibrated copy of the float model; ``(model, conversion report, seconds)``."""
    model = copy.deepcopy(float_model)
    ptq = build_ptq(method, qconfig, bits)
    report = ptq.convert(model, example_forward=lambda: fwd(model, batches[0]))
    t0 = time.perf_counter()
    ptq.calibrate(model, batches, forward_fn=fwd)
    return model, report, time.perf_counter() - t0


def table(rows, float_metric) -> str:
    has_metric = float_metric is not None
    head = '| layer | params | bits | only: SQNR dB / cos' + (' / top-1' if has_metric else '') + \
        ' | all but: SQNR dB / cos' + (' / top-1' if has_metric else '') + ' | weight noise at ' + \
        ', '.join(f'w{b}' for b in sorted(rows[0].noise)) + ' |'
    lines = [head, '|' + '---|' * 7]

    def view(sqnr, cos, metric):
        return f'{sqnr:.1f} / {cos:.4f}' + (f' / {metric:.2f}' if has_metric else '')
    for r in rows:
        bits = f'w{r.w_bits}' + ('' if r.a_bits is None else f'a{r.a_bits}')
        noise = ', '.join(f'{r.noise[b]:.2e}' for b in sorted(r.noise))
        lines.append(f'| {r.name} | {r.params} | {bits} | {view(r.only_sqnr, r.only_cosine, r.only_metric)} | '
                     f'{view(r.all_but_sqnr, r.all_but_cosine, r.all_but_metric)} | {noise} |')
    return '\n'.join(lines)


def plot(rows, float_metric, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [r.name.replace('backbone.', '') for r in rows]
    panels = [('output SQNR (dB), only this layer quantized', [r.only_sqnr for r in rows])]
    if float_metric is not None:
        panels.append(('top-1 drop (points), only this layer quantized',
                       [float_metric - r.only_metric for r in rows]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.45 * len(rows)), 3.2 * len(panels)), squeeze=False)
    for ax, (label, values) in zip(axes[:, 0], panels):
        finite = [v if v == v and abs(v) != float('inf') else 0.0 for v in values]
        ax.bar(range(len(rows)), finite, color='tab:blue')
        ax.set_ylabel(label, fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=75, fontsize=7)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)


def mixed_config(config, out_dir, method, bits, overrides) -> str:
    base = osp.relpath(osp.abspath(config), osp.abspath(out_dir))
    lines = [f'# Written by tools/analyze.py: {method} at {bits} with the suggested per-layer weight bits.',
             f"_base_ = ['{base}']",
             'custom_imports = dict(imports=[\'mmquant\'], allow_failed_imports=False)',
             f"quant = dict(method='{method}', bits='{bits}', qconfig=dict(overrides={{"]
    lines += [f"    '{name}': dict(w_bits={b})," for name, b in overrides.items()]
    lines += ['}))', "test_cfg = dict(type='PTQLoop')", '']
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_method(args.quant)
        w_bits, a_bits = parse_bits(args.quant_bits)
        candidates = sorted({check_bits(int(b), '--candidates') for b in args.candidates.split(',')})
        avg = float(args.avg_bits) if args.avg_bits is not None else float(w_bits)
        if not candidates[0] <= avg:
            raise ValueError(f'--avg-bits {avg} is below the smallest candidate {candidates[0]}')
        if args.calib_images < 1 or args.eval_images < 1:
            raise ValueError('--calib-images and --eval-images must be >= 1')
    except ValueError as e:
        fail(str(e))
    check_file(args.config, 'config')
    check_file(args.checkpoint, 'checkpoint')
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.runner import Runner
    from mmquant.engine.ptq_loop import _take_images, default_calib_dataloader, tensor_forward

    cfg = Config.fromfile(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out_dir or osp.join('work_dirs', 'analyze', f'{name}_{args.quant_bits}')
    os.makedirs(out_dir, exist_ok=True)
    cfg.work_dir = out_dir
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    logger = MMLogger.get_current_instance()
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    float_model = runner.model.eval()
    calib, n_calib = _take_images(runner.build_dataloader(default_calib_dataloader(runner, cfg.test_dataloader),
                                                          seed=runner.seed), args.calib_images)
    loader = runner.build_dataloader(cfg.test_dataloader, seed=runner.seed)
    evals, n_eval = _take_images(loader, args.eval_images)
    classifier = cfg.get('default_scope') != 'mmdet'
    metric_fn = top1(evals) if classifier else None

    model, report, calib_s = quantize(float_model, args.quant, args.quant_bits, None, calib, tensor_forward)
    logger.info(f'{args.quant} {args.quant_bits}: calibrated on {n_calib} images in {calib_s:.1f} s; '
                f'views on {n_eval} test images')
    reference = float_outputs(model, evals, tensor_forward)      # one float pass serves both steps
    bar = Progress(len(report.quantized), 'sensitivity: layers', logger)
    float_metric, rows = layer_sensitivity(model, evals, tensor_forward, metric_fn, progress=bar,
                                           reference=reference)
    bar.close()
    bar = Progress(len(rows), f'sensitivity: weight noise at {candidates} bits', logger)
    weight_noise(model, rows, candidates, evals, tensor_forward, progress=bar, reference=reference)
    bar.close()
    fixed = list(report.first_layers) + list(report.last_layers)
    try:
        chosen = suggest_bits(rows, avg, fixed=fixed)
    except ValueError as e:
        fail(str(e))
    print(table(rows, float_metric))
    worst = sorted(rows, key=lambda r: r.only_sqnr)[:3]
    print('\nmost sensitive (lowest SQNR with only that layer quantized): ' +
          ', '.join(f'{r.name} ({r.only_sqnr:.1f} dB)' for r in worst))
    print(f'suggested weight bits at {avg:g} bits per weight (first / last layers keep theirs): ' +
          ', '.join(f'{n} w{b}' for n, b in chosen.items()))

    result = dict(config=args.config, checkpoint=args.checkpoint, method=args.quant, bits=args.quant_bits,
                  calib_images=n_calib, eval_images=n_eval, float_metric=float_metric,
                  layers=[dict(r.__dict__, noise={str(k): v for k, v in r.noise.items()}) for r in rows],
                  avg_bits=avg, fixed_layers=fixed, suggested=chosen)
    mixed_path = osp.join(out_dir, f'mixed_{args.quant_bits}.py')
    write_text_atomic(mixed_path, mixed_config(args.config, out_dir, args.quant, args.quant_bits, chosen))
    plot(rows, float_metric, osp.join(out_dir, 'sensitivity.png'),
         f'{name}: {args.quant} {args.quant_bits}, {n_eval} test images')

    if args.verify:
        evaluator = runner.build_evaluator(cfg.test_evaluator)
        evaluator.dataset_meta = loader.dataset.metainfo
        rows_out = []
        for label, qconfig in (('uniform', None),
                               ('suggested', dict(overrides={n: dict(w_bits=b) for n, b in chosen.items()}))):
            m, _, secs = quantize(float_model, args.quant, args.quant_bits, qconfig, calib, tensor_forward)
            metrics = evaluate(m, loader, evaluator)
            size = weight_bytes(m)
            rows_out.append(dict(label=label, weight_bytes=size, metrics=metrics, calib_seconds=secs))
            print(f'{label}: weights {size / 1e6:.3f} MB, ' +
                  ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()))
        result['verify'] = rows_out
    write_text_atomic(osp.join(out_dir, 'sensitivity.json'), json.dumps(result, indent=2, default=float))
    print(f'wrote {out_dir}/sensitivity.json, sensitivity.png, {osp.basename(mixed_path)}')
    return result


if __name__ == '__main__':
    main()
