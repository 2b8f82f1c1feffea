"""Accuracy / AP table of post-training quantization methods over bit widths, in one process.

The float model, the calibration images and the test set are loaded once; every cell quantizes a
fresh copy of the float model, calibrates it on the same images and evaluates it with the
config's evaluator. Prints a Markdown table (rows: bit settings, columns: method and weight
granularity) and, with ``--out``, writes every cell with its calibration time as JSON. For
classifiers it also prints each method against the baseline method (``--baseline``, default minmax)
on the same images: the accuracy difference, the images only one of them gets right, and the exact
McNemar p-value (benchmarks/paired.py), so a gap of a few images is not read as a result.

    python benchmarks/ptq_table.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/epoch_8.pth \\
        --methods minmax,bitsplit --granularity channel,layer --bits w8a8,w6,w5,w4,w3,w4a8,w4a4,w3a8
    # calibration time and accuracy against bitsplit's samples per layer:
    python benchmarks/ptq_table.py CONFIG CKPT --methods bitsplit --bits w4a8 --sweep num_samples=512,1024,4096
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
from mmengine.config import DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401  (registers entry points, allow-lists checkpoint classes)
from mmquant.engine.cli import check_file, fail  # noqa: E402
from mmquant.engine.ptq_loop import (_take_images, default_calib_dataloader, forward_logs,  # noqa: E402
                                     mm_method_options, task_loss, tensor_forward)
from mmquant.convert import weight_bytes  # noqa: E402
from mmquant.fileio import write_text_atomic  # noqa: E402
from mmquant.ptq import build_ptq, check_method  # noqa: E402
from mmquant.qconfig import parse_bits  # noqa: E402

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from paired import compare  # noqa: E402

GRANULARITY = {'channel': True, 'layer': False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint')
    p.add_argument('--methods', default='minmax,bitsplit', help='comma-separated PTQ methods')
    p.add_argument('--bits', default='w8a8,w6,w5,w4,w3,w4a8,w4a4,w3a8', help='comma-separated settings')
    p.add_argument('--granularity', default='channel,layer',
                   help='weight scales: channel (per output channel), layer (one per layer), or both')
    p.add_argument('--calib-images', type=int, default=None,
                   help='calibration images from the train set (default 1024; 64 for mmdet)')
    p.add_argument('--options', nargs='+', default=[], metavar='METHOD.OPTION=VALUE',
                   help='method options, e.g. bitsplit.num_samples=2048 bitsplit.iters=4')
    p.add_argument('--sweep', default=None, metavar='OPTION=V1,V2,...',
                   help='one method option swept over values (one column each), e.g. num_samples=512,4096')
    p.add_argument('--metric', default=None,
                   help='metric key(s) to tabulate, comma-separated, e.g. coco/bbox_mAP,coco/segm_mAP '
                        '(default: the first metric); COCO mAPs are shown in percent')
    p.add_argument('--qconfig', default=None, metavar='JSON',
                   help='extra QConfig fields for every cell, e.g. '
                        '\'{"overrides": {"backbone.layer1.0.conv1": {"a_bits": 8}}}\'')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--out', help='write all cells to this JSON file')
    p.add_argument('--no-float', action='store_true', help='skip the float row')
    p.add_argument('--resume', action='store_true',
                   help='keep the cells an interrupted run with the same arguments finished (saved next to --out '
                        'after every cell), run the rest')
    p.add_argument('--baseline', default='minmax',
                   help='method the others are compared with image by image (classifiers; default minmax)')
    return p.parse_args(argv)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_qconfig(text):
    """``--qconfig`` JSON -> dict of QConfig fields (checked by building a QConfig)."""
    if text is None:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'--qconfig is not valid JSON ({e.msg}); expected e.g. '
                         '{"overrides": {"backbone.layer1.0.conv1": {"a_bits": 8}}}')
    if not isinstance(extra, dict):
        raise ValueError('--qconfig must be a JSON object of QConfig fields')
    from mmquant.qconfig import QConfig
    QConfig.build(extra)
    return extra


def method_options(items) -> dict:
    """``['bitsplit.num_samples=2048']`` -> ``{'bitsplit': {'num_samples': 2048}}``."""
    out = {}
    for item in items:
        key, eq, value = item.partition('=')
        method, dot, option = key.partition('.')
        if not (eq and dot and option):
            raise ValueError(f'--options {item!r}: expected METHOD.OPTION=VALUE, e.g. bitsplit.num_samples=2048')
        out.setdefault(check_method(method), {})[option] = parse_value(value)
    return out


def cells(args):
    """(column label, method, options, per_channel) for every column of the table."""
    methods = [check_method(m) for m in args.methods.split(',')]
    check_method(args.baseline)
    grans = args.granularity.split(',')
    bad = [g for g in grans if g not in GRANULARITY]
    if bad:
        raise ValueError(f'unknown granularity {bad}; accepted: {", ".join(GRANULARITY)}')
    options = method_options(args.options)
    sweep = [(None, None)]
    if args.sweep:
        key, _, values = args.sweep.partition('=')
        if not values:
            raise ValueError(f'--sweep {args.sweep!r}: expected OPTION=V1,V2,...')
        sweep = [(key, parse_value(v)) for v in values.split(',')]
    out = []
    for method in methods:
        opts = options.get(method, {})
        for gran in grans:
            for key, value in sweep:
                o = dict(opts, **({key: value} if key else {}))
                label = f'{method} ({gran})' + (f' {key}={value}' if key else '')
                build_ptq(method, None, 'w8a8', **o)          # unknown options fail here, early
                out.append((label, method, o, GRANULARITY[gran]))
    return out


def evaluate(model, loader, evaluator):
    """``(metrics, correct)``; ``correct`` lists per test image whether the top-1 class is right
    (``None`` for models that do not predict labels, e.g. detectors)."""
    model.eval()
    correct = []
    with torch.no_grad():
        for data in loader:
            samples = model.test_step(data)
            for s in samples:
                if correct is not None and 'pred_label' in s and 'gt_label' in s:
                    correct.append(int(s.pred_label[0]) == int(s.gt_label[0]))
                else:
                    correct = None
            evaluator.process(data_samples=samples, data_batch=data)
    return evaluator.evaluate(len(loader.dataset)), correct


def paired_rows(results, settings, columns, baseline):
    """Compare every column with the baseline method's column of the same granularity (and sweep
    value), image by image; adds ``paired`` to those results. Returns the compared label pairs."""
    by = {(r['bits'], r['column']): r for r in results}
    pairs = []
    for label, method, _, _ in columns:
        ref = label.replace(method, baseline, 1)
        if method != baseline and ref in {c[0] for c in columns}:
            pairs.append((ref, label))
    for bits in settings:
        for ref, label in pairs:
            a, b = by[(bits, ref)], by[(bits, label)]
            if a.get('correct') is not None and b.get('correct') is not None:
                b['paired'] = dict(baseline=ref, **compare(a['correct'], b['correct']))
    return pairs


def pick(metrics: dict, keys):
    """``(keys, values)`` of the tabulated metrics; ``keys=None``: the evaluator's first."""
    keys = keys or [next(iter(metrics))]
    missing = [k for k in keys if k not in metrics]
    if missing:
        fail(f'metric {missing[0]!r} not in {sorted(metrics)}')
    return keys, [float(metrics[k]) * (100 if k.startswith('coco/') else 1) for k in keys]


def float_weight_bytes(model) -> float:
    """Bytes of the conv / linear weights in float32 (the layers a conversion quantizes)."""
    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)
    return sum(4 * m.weight.numel() for m in model.modules() if isinstance(m, kinds))


def cell(values) -> str:
    return ' / '.join(f'{v:.2f}' for v in values)


def signature(args, settings, columns, n_calib) -> dict:
    """What a resumed run must share with the interrupted one for its cells to be kept."""
    return dict(config=args.config, checkpoint=args.checkpoint, calib_images=n_calib, bits=settings,
                columns=[c[0] for c in columns], options=sorted(args.options), qconfig=args.qconfig,
                cfg_options={k: repr(v) for k, v in (args.cfg_options or {}).items()}, no_float=args.no_float,
                metric=args.metric, threads=torch.get_num_threads())


def save_cells(path, sig, results):
    """The finished cells, per-image results as a '0'/'1' string; written atomically."""
    rows = [dict(r, correct=None if r.get('correct') is None else ''.join('1' if c else '0' for c in r['correct']))
            for r in results]
    write_text_atomic(path, json.dumps(dict(signature=sig, results=rows), default=float))


def load_cells(path, sig) -> list:
    """Cells of an interrupted run with the same signature; none when there is no such run."""
    if not osp.isfile(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    if saved.get('signature') != sig:
        fail(f'{path} holds cells of a run with other arguments; delete it or run without --resume')
    rows = saved['results']
    for r in rows:
        if r.get('correct') is not None:
            r['correct'] = [c == '1' for c in r['correct']]
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.resume and not args.out:
        fail('--resume needs --out (the finished cells are kept next to it)')
    try:
        columns = cells(args)
        settings = [b.strip() for b in args.bits.split(',')]
        for b in settings:
            parse_bits(b)
        extra_qconfig = parse_qconfig(args.qconfig)
    except ValueError as e:
        fail(str(e))
    check_file(args.config, 'config')
    check_file(args.checkpoint, 'checkpoint')
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = osp.join('work_dirs', 'benchmarks', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = None
    runner = Runner.from_cfg(cfg)
    logger = MMLogger.get_current_instance()
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    float_model = runner.model
    loader = runner.build_dataloader(cfg.test_dataloader, seed=runner.seed)
    evaluator = runner.build_evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = loader.dataset.metainfo
    n_calib = args.calib_images or (64 if cfg.get('default_scope') == 'mmdet' else 1024)
    calib_cfg = default_calib_dataloader(runner, cfg.test_dataloader)
    batches, n_calib = _take_images(runner.build_dataloader(calib_cfg, seed=runner.seed), n_calib)
    example = batches[0]

    partial = args.out + '.cells.json' if args.out else None
    sig = signature(args, settings, columns, n_calib)
    results = load_cells(partial, sig) if args.resume else []
    done = {(r['bits'], r['column']) for r in results}
    if done:
        logger.info(f'resumed: {len(done)} cells kept from {partial}')
    metric_key = args.metric.split(',') if args.metric else (results[0]['metric_key'] if results else None)
    if not args.no_float and ('fp', 'float') not in done:
        t0 = time.perf_counter()
        metrics, _ = evaluate(float_model, loader, evaluator)
        metric_key, value = pick(metrics, metric_key)
        results.append(dict(bits='fp', column='float', value=value[0], values=value, metrics=metrics,
                            eval_seconds=time.perf_counter() - t0, weight_bytes=float_weight_bytes(float_model),
                            metric_key=metric_key))
        logger.info(f'float: {",".join(metric_key)} = {cell(value)}')
        if partial:
            save_cells(partial, sig, results)
    logged_layers = False
    for bits in settings:
        for label, method, options, per_channel in columns:
            if (bits, label) in done:
                continue
            model = copy.deepcopy(float_model)
            qconfig = dict(extra_qconfig, default=dict(extra_qconfig.get('default') or {}, w_per_channel=per_channel))
            ptq = build_ptq(method, qconfig, bits, **mm_method_options(method, float_model, options))
            report = ptq.convert(model, example_forward=lambda: tensor_forward(model, example))
            if not logged_layers:     # which layers are quantized, which stay float and why
                logger.info(report.format())
                logged_layers = True
            t0 = time.perf_counter()
            with forward_logs(logger):
                ptq.calibrate(model, batches, forward_fn=tensor_forward, loss_fn=task_loss)
            calib = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics, correct = evaluate(model, loader, evaluator)
            metric_key, value = pick(metrics, metric_key)
            results.append(dict(bits=bits, column=label, method=method, options=options,
                                per_channel=per_channel, value=value[0], values=value, metrics=metrics,
                                weight_bytes=weight_bytes(model),
                                calib_seconds=calib, eval_seconds=time.perf_counter() - t0,
                                correct=correct, metric_key=metric_key))
            logger.info(f'{bits} {label}: {",".join(metric_key)} = {cell(value)} (calibration {calib:.1f} s)')
            del model
            if partial:
                save_cells(partial, sig, results)
    table = format_table(results, settings, [c[0] for c in columns], metric_key, n_calib)
    print(table)
    pairs = paired_rows(results, settings, columns, args.baseline)
    paired = format_paired(results, settings, pairs)
    if paired:
        print('\n' + paired)
    for r in results:                 # per-image results: used above, too long for the JSON
        r.pop('correct', None)
    if args.out:
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(dict(config=args.config, checkpoint=args.checkpoint, calib_images=n_calib,
                           metric=','.join(metric_key), threads=torch.get_num_threads(), results=results),
                      f, indent=2, default=float)
        os.replace(tmp, args.out)
        if osp.isfile(partial):
            os.remove(partial)
    return results


def format_table(results, settings, labels, metric_key, n_calib) -> str:
    """Markdown: one row per bit setting, one column per method; calibration seconds in brackets."""
    by = {(r['bits'], r['column']): r for r in results}
    lines = [f'{" / ".join(metric_key)}; calibration seconds in brackets ({n_calib} calibration images, '
             f'{torch.get_num_threads()} threads)', '',
             '| bits | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
    fp = by.get(('fp', 'float'))
    if fp:
        lines.append('| FP | ' + ' | '.join(cell(fp['values']) for _ in labels) + ' |')
    for bits in settings:
        row = []
        for label in labels:
            r = by[(bits, label)]
            row.append(f'{cell(r["values"])} ({r["calib_seconds"]:.0f} s)')
        lines.append(f'| {bits.upper()} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def format_paired(results, settings, pairs) -> str:
    """Markdown: per bit setting, each method minus its baseline in top-1 points, the images only
    the baseline / only the method gets right, and the exact McNemar p-value."""
    by = {(r['bits'], r['column']): r for r in results}
    pairs = [(ref, label) for ref, label in pairs
             if all('paired' in by[(bits, label)] for bits in settings)]
    if not pairs:
        return ''
    lines = ['paired on the same test images: difference in points (images only the baseline gets right / '
             'only the method gets right, exact McNemar p)', '',
             '| bits | ' + ' | '.join(f'{label} - {ref}' for ref, label in pairs) + ' |',
             '|---' * (len(pairs) + 1) + '|']
    for bits in settings:
        row = []
        for ref, label in pairs:
            q = by[(bits, label)]['paired']
            row.append(f'{q["diff"]:+.2f} ({q["b"]}/{q["c"]}, p={q["p"]:.2g})')
        lines.append(f'| {bits.upper()} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
