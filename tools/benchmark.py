"""Regenerate the results tables of the README from the project's own configs, with plots.

    python tools/benchmark.py --mode quick      # smoke run: few images, few iterations (minutes)
    python tools/benchmark.py --mode full       # the README's settings (hours on a 2-core CPU)
    python tools/benchmark.py --mode full --steps ptq_resnet18,latency --resume

Every step is one run of a benchmark script or tool in its own process (its log next to its
result in ``--out-dir``): PTQ tables of ResNet-18 and VGG-11-BN (min-max, BitSplit, BRECQ, BRECQ +
QDrop; accuracy, calibration time and weight size per cell), the QAT table (each method from the
float checkpoint), onnxruntime latency (FP32 against the QDQ and integer-only exports), and the
RetinaNet PTQ table (bbox mAP). Float checkpoints come from ``--checkpoints`` (defaults: the
recipes' work dirs); a missing one is trained first with its recipe (quick mode: 100 iterations).
The report, ``results.md``, carries the machine, the library versions and the commit, and the
plots: accuracy against bits per method and accuracy against weight size (the Pareto front), one
pair per model. ``--resume`` keeps the steps whose results are already in ``--out-dir`` and, of an
interrupted step, the cells or training runs it had finished, so a full run can span several sittings.
"""
import argparse
import datetime
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
sys.path.insert(0, ROOT)
from mmquant.fileio import write_atomic, write_text_atomic  # noqa: E402

sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
from qat_table import fail  # noqa: E402  (the benchmarks' one-line error)

CHECKPOINTS = dict(
    resnet18='work_dirs/resnet18_fashionmnist/epoch_8.pth',
    vgg11bn='work_dirs/vgg11bn_fashionmnist/epoch_4.pth',
    retinanet='work_dirs/retinanet_r18_fpn_fashiondet/epoch_6.pth')
CONFIGS = dict(
    resnet18='configs/resnet18_fashionmnist.py',
    vgg11bn='configs/vgg11bn_fashionmnist.py',
    retinanet='configs/retinanet_r18_fpn_fashiondet.py')

# per mode: bit settings, BRECQ iterations, calibration images, test images, QAT runs
MODES = dict(
    quick=dict(bits='w4a4,w2a4', brecq_iters=20, calib=128, test=500, det_bits='w8a8', det_calib=8,
               det_test=20, qat_runs='lsq:w4a4', qat_images=1024, latency_runs=5, train_iters=100),
    full=dict(bits='w4,w3,w2,w4a4,w3a3,w2a4', brecq_iters=500, calib=1024, test=None, det_bits='w8a8,w4a8',
              det_calib=64, det_test=None, qat_runs=None, qat_images=None, latency_runs=50, train_iters=None))
# scripts that keep the finished part of an interrupted run (cells, training runs) with --resume
RESUMES_ITSELF = ('ptq_resnet18', 'ptq_resnet18_qdrop', 'ptq_vgg11bn', 'ptq_vgg11bn_qdrop', 'ptq_retinanet', 'qat')
STEPS = ('ptq_resnet18', 'ptq_vgg11bn', 'qat', 'latency', 'ptq_retinanet')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--mode', choices=sorted(MODES), default='quick')
    p.add_argument('--steps', default=','.join(STEPS), help=f'comma-separated, of: {", ".join(STEPS)}')
    p.add_argument('--out-dir', default=None, help='default work_dirs/benchmark/<mode>')
    p.add_argument('--checkpoints', nargs='*', default=[], metavar='MODEL=PATH',
                   help=f'float checkpoints ({", ".join(CHECKPOINTS)}); defaults: the recipes\' work dirs')
    p.add_argument('--resume', action='store_true',
                   help='keep the steps whose results are in --out-dir, and the finished cells / runs of an '
                        'interrupted step')
    p.add_argument('--jobs', type=int, default=1,
                   help='QAT training runs at once (benchmarks/qat_table.py --jobs: each gets cores // jobs threads)')
    p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    return p.parse_args(argv)


def check_args(args):
    steps = [s.strip() for s in args.steps.split(',') if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise ValueError(f'unknown step {bad[0] if bad else "(none)"!r}; accepted: {", ".join(STEPS)}')
    if args.jobs < 1:
        raise ValueError(f'--jobs={args.jobs} must be >= 1')
    ckpts = dict(CHECKPOINTS)
    for item in args.checkpoints:
        key, sep, path = item.partition('=')
        if not sep or key not in CHECKPOINTS:
            raise ValueError(f'--checkpoints {item!r}: expected MODEL=PATH with MODEL in {", ".join(CHECKPOINTS)}')
        ckpts[key] = path
    return steps, ckpts


def subset(n):
    """--cfg-options that cut the test set to its first ``n`` images (``None``: all)."""
    if n is None:
        return []
    return [f'test_dataloader.dataset.indices={n}', f'val_dataloader.dataset.indices={n}']


def commands(step, mode, ckpts, out_dir, jobs=1):
    """``[(name, argv, result file)]`` of one step."""
    m = MODES[mode]
    if step in ('ptq_resnet18', 'ptq_vgg11bn'):
        model = step[4:]
        base = [PY, 'benchmarks/ptq_table.py', CONFIGS[model], ckpts[model], '--granularity', 'channel',
                '--bits', m['bits'], '--calib-images', str(m['calib'])]
        cfg = subset(m['test'])
        cfg_opt = ['--cfg-options'] + cfg if cfg else []
        out = [(f'{step}', base + ['--methods', 'minmax,bitsplit,brecq', '--options', f'brecq.iters={m["brecq_iters"]}',
                                   '--out', osp.join(out_dir, f'{step}.json')] + cfg_opt, f'{step}.json')]
        out.append((f'{step}_qdrop', base + ['--methods', 'brecq', '--no-float', '--options',
                                             f'brecq.iters={m["brecq_iters"]}', 'brecq.drop_prob=0.5',
                                             '--out', osp.join(out_dir, f'{step}_qdrop.json')] + cfg_opt,
                    f'{step}_qdrop.json'))
        return out
    if step == 'ptq_retinanet':
        cfg = subset(m['det_test'])
        return [(step, [PY, 'benchmarks/ptq_table.py', CONFIGS['retinanet'], ckpts['retinanet'], '--granularity',
                        'channel', '--methods', 'minmax,bitsplit', '--bits', m['det_bits'], '--calib-images',
                        str(m['det_calib']), '--metric', 'coco/bbox_mAP', '--out', osp.join(out_dir, f'{step}.json')]
                 + (['--cfg-options'] + cfg if cfg else []), f'{step}.json')]
    if step == 'qat':
        argv = [PY, 'benchmarks/qat_table.py', ckpts['resnet18'], '--epochs', '1', '--work-root',
                osp.join(out_dir, 'qat_runs'), '--out', osp.join(out_dir, 'qat.json'), '--jobs', str(jobs)]
        if m['qat_runs']:
            argv += ['--runs', m['qat_runs']]
        if m['qat_images']:
            argv += ['--cfg-options', f'train_dataloader.dataset.indices={m["qat_images"]}'] + subset(m['test'])
        return [(step, argv, 'qat.json')]
    if step == 'latency':
        work = osp.join(out_dir, 'latency')
        q = osp.join(work, 'minmax_w8a8.pth')
        cfg_opt = ['--cfg-options', 'quant.options.fold_bn=True', 'quant.options.quant_residual=True'] + subset(m['test'])
        return [
            ('latency_ptq', [PY, 'tools/test.py', CONFIGS['resnet18'], ckpts['resnet18'], '--quant', 'minmax',
                             '--quant-bits', 'w8a8', '--calib-images', str(m['calib']), '--work-dir', work,
                             '--out-metrics', osp.join(work, 'metrics.json')] + cfg_opt, None),
            ('latency_qdq', [PY, 'tools/export.py', CONFIGS['resnet18'], q, '--format', 'qdq', '--out',
                             osp.join(work, 'r18_w8a8_qdq.onnx')], None),
            ('latency_int', [PY, 'tools/export.py', CONFIGS['resnet18'], q, '--format', 'int', '--out',
                             osp.join(work, 'r18_w8a8_int.onnx')], None),
            ('latency', [PY, 'benchmarks/onnx_latency.py', CONFIGS['resnet18'], ckpts['resnet18'],
                         osp.join(work, 'r18_w8a8_qdq.onnx'), osp.join(work, 'r18_w8a8_int.onnx'),
                         '--runs', str(m['latency_runs']), '--profile'], 'latency.md'),
        ]
    raise ValueError(step)


def train_command(model, mode, ckpt):
    """Train a missing float checkpoint with its recipe (quick: a few iterations)."""
    work = osp.dirname(ckpt) or '.'
    argv = [PY, 'tools/train.py', CONFIGS[model], '--work-dir', work]
    iters = MODES[mode]['train_iters']
    if iters:
        argv += ['--cfg-options', 'train_cfg.type=IterBasedTrainLoop', f'train_cfg.max_iters={iters}',
                 'train_cfg.val_interval=100000', 'param_scheduler=[]',
                 'default_hooks.checkpoint.by_epoch=False', f'default_hooks.checkpoint.interval={iters}']
    return argv


def read_steps(path):
    """The step records of ``steps.json`` (``{}`` before the first step)."""
    if not osp.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run(name, argv, out_dir):
    log = osp.join(out_dir, f'{name}.log')
    t0 = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    with open(log) as f:
        text = f.read()
    return proc.returncode, time.time() - t0, text


def environment() -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported as such
            return 'not installed'
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or 'unknown'
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=ROOT, capture_output=True, text=True).stdout
        commit += ' (uncommitted changes)' if dirty.strip() else ''
    except OSError:
        commit = 'unknown'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return dict(date=datetime.datetime.now().isoformat(timespec='seconds'), machine=f'{cpu}, {os.cpu_count()} cores',
                python=platform.python_version(), commit=commit,
                **{m: version(m) for m in ('torch', 'mmengine', 'mmcv', 'mmpretrain', 'mmdet', 'onnxruntime')})


def ptq_markdown(title, result, extra=None) -> str:
    """One table: rows = bit settings, columns = methods; accuracy with calibration seconds."""
    rows = list(result['results']) + (list(extra['results']) if extra else [])
    settings = list(dict.fromkeys(r['bits'] for r in rows))
    columns = [c for c in dict.fromkeys(r['column'] for r in rows if r['bits'] != 'fp')]
    cells = {(r['bits'], r['column']): r for r in rows}
    lines = [f'**{title}** ({result["metric"]}, {result["calib_images"]} calibration images; '
             'calibration seconds and weight MB in brackets)', '',
             '| bits | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    for b in settings:
        out = []
        for c in columns:
            r = cells.get((b, c)) or (cells.get(('fp', 'float')) if b == 'fp' else None)
            if r is None:
                out.append('')
                continue
            extra_s = f'{r["calib_seconds"]:.0f} s, ' if 'calib_seconds' in r else ''
            size = f'{r["weight_bytes"] / 1e6:.2f} MB' if r.get('weight_bytes') else ''
            out.append(f'{r["value"]:.2f} ({extra_s}{size})' if (extra_s or size) else f'{r["value"]:.2f}')
        lines.append(f'| {b.upper()} | ' + ' | '.join(out) + ' |')
    return '\n'.join(lines)


def plot_ptq(name, result, extra, out_dir):
    """Accuracy against bits per method, and accuracy against weight size (Pareto front)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in list(result['results']) + (list(extra['results']) if extra else []) if r['bits'] != 'fp']
    fp = next((r for r in result['results'] if r['bits'] == 'fp'), None)
    settings = list(dict.fromkeys(r['bits'] for r in rows))
    columns = list(dict.fromkeys(r['column'] for r in rows))
    paths = []
    floor = plot_floor([r['value'] for r in rows], fp and fp['value'])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in columns:
        ys = [next((r['value'] for r in rows if r['bits'] == b and r['column'] == c), float('nan')) for b in settings]
        line, = ax.plot(range(len(settings)), [max(y, floor) for y in ys], marker='o', label=c)
        _mark_below(ax, list(range(len(settings))), ys, floor, line.get_color())
    if fp:
        ax.axhline(fp['value'], color='grey', ls='--', lw=1, label='float')
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([b.upper() for b in settings])
    below = '' if floor == -float('inf') else f'\n(values under {floor:.1f}: on the floor, written)'
    paths.append(_finish(plt, fig, ax, result['metric'], f'{name}: accuracy against bits{below}',
                         osp.join(out_dir, f'{name}_bits.png')))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    pts = [(r['weight_bytes'] / 1e6, r['value'], r['column']) for r in rows if r.get('weight_bytes')]
    if fp and fp.get('weight_bytes'):
        pts.append((fp['weight_bytes'] / 1e6, fp['value'], 'float'))
    for c in dict.fromkeys(p[2] for p in pts):
        mine = [p for p in pts if p[2] == c]
        dots = ax.scatter([p[0] for p in mine], [max(p[1], floor) for p in mine], label=c, s=18)
        _mark_below(ax, [p[0] for p in mine], [p[1] for p in mine], floor, dots.get_facecolor()[0])
    front, best = [], -float('inf')
    for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1])):     # the best at each size first
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.step([p[0] for p in front], [max(p[1], floor) for p in front], where='post', color='black', lw=1,
                label='Pareto front')
    ax.set_xscale('log')
    sizes = sorted({round(p[0], 2) for p in pts})
    ax.set_xticks(sizes, [f'{v:.1f}' for v in sizes], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_xlabel('weights (MB)')
    paths.append(_finish(plt, fig, ax, result['metric'], f'{name}: accuracy against size{below}',
                         osp.join(out_dir, f'{name}_pareto.png')))
    return paths


FLOOR_BELOW_FLOAT = 5.0   # points of the plots: the y axis starts this far below float


def plot_floor(values, fp):
    """The y axis' lower end: ``FLOOR_BELOW_FLOAT`` under the float result when a collapsed cell
    (min-max at 2 bits: 10%) would otherwise squash the methods that work into one line, else
    ``-inf`` (no floor)."""
    if fp is None or not values or min(values) >= fp - FLOOR_BELOW_FLOAT:
        return -float('inf')
    return fp - FLOOR_BELOW_FLOAT


def _mark_below(ax, xs, ys, floor, color):
    """Points under the floor: drawn on it as a down triangle with their value written."""
    for x, y in zip(xs, ys):
        if y < floor:
            ax.scatter([x], [floor], marker='v', s=40, color=color, zorder=3)
            ax.annotate(f'{y:.1f}', (x, floor), textcoords='offset points', xytext=(4, 4), fontsize=7, color=color)


def _finish(plt, fig, ax, ylabel, title, path):
    """Label, lay out and write one plot (PNG, atomically); returns its path."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)
    return path


def qat_markdown(result) -> str:
    rows = result['rows']
    fp = rows[0]['fp_top1'] if rows else float('nan')
    lines = [f'**QAT** (ResNet-18, 1 epoch from the float checkpoint, float top-1 {fp:.2f})', '',
             '| method | bits | top-1 | vs FP | train wall (s) |', '|---|---|---|---|---|']
    for r in rows:
        top1 = 'failed' if r['top1'] is None else f'{r["top1"]:.2f}'
        delta = '' if r['top1'] is None else f'{r["top1"] - fp:+.2f}'
        lines.append(f'| {r["method"]} | {r["bits"].upper()} | {top1} | {delta} | {r["seconds"]:.0f} |')
    return '\n'.join(lines)


def step_line(name, rec, commit) -> str:
    """One step of ``steps.json`` for the report: wall time, and what differs from the report's run."""
    notes = [] if rec['rc'] == 0 else [f'FAILED, rc {rec["rc"]}']
    if rec.get('resumed'):
        notes.append('resumed: the time of the sitting that finished it')
    if rec.get('commit') != commit:
        notes.append(f'commit {rec.get("commit")}, {rec.get("date")}')
    return f'{name} {rec["seconds"]:.0f} s' + (f' ({"; ".join(notes)})' if notes else '')


def report(out_dir, env, mode, steps) -> str:
    """``results.md`` from the results in ``out_dir`` (and the plots it draws); ``steps``: the
    records of ``steps.json`` (every step run into ``out_dir``, in this sitting or an earlier one)."""
    parts = [f'# mmquant benchmark ({mode} mode)', '',
             f'{env["date"]}, commit {env["commit"]}; {env["machine"]}; Python {env["python"]}, ' +
             ', '.join(f'{k} {env[k]}' for k in ('torch', 'mmengine', 'mmcv', 'mmpretrain', 'mmdet', 'onnxruntime')),
             '', 'Steps and wall time: ' + ', '.join(step_line(n, r, env['commit']) for n, r in steps.items()), '']

    def load(name):
        path = osp.join(out_dir, name)
        if not osp.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)
    for model in ('resnet18', 'vgg11bn', 'retinanet'):
        res = load(f'ptq_{model}.json')
        if res is None:
            continue
        extra = load(f'ptq_{model}_qdrop.json')
        if extra:
            for r in extra['results']:
                r['column'] = r['column'].replace('brecq', 'brecq + QDrop 0.5', 1)
        parts += [ptq_markdown(f'PTQ, {model}', res, extra), '']
        if model != 'retinanet':
            for path in plot_ptq(model, res, extra, out_dir):
                parts += [f'![{osp.basename(path)}]({osp.basename(path)})', '']
    qat = load('qat.json')
    if qat:
        parts += [qat_markdown(qat), '']
    lat = osp.join(out_dir, 'latency.md')
    if osp.isfile(lat):
        with open(lat) as f:
            parts += ['**onnxruntime latency** (ResNet-18, min-max W8A8, BatchNorm folded, residual streams '
                      'quantized)', '', f.read().strip(), '']
    return '\n'.join(parts) + '\n'


def main(argv=None):
    args = parse_args(argv)
    try:
        steps, ckpts = check_args(args)
    except ValueError as e:
        fail(str(e))
    out_dir = args.out_dir or osp.join('work_dirs', 'benchmark', args.mode)
    os.makedirs(out_dir, exist_ok=True)
    needs = {'ptq_resnet18': ['resnet18'], 'ptq_vgg11bn': ['vgg11bn'], 'qat': ['resnet18'],
             'latency': ['resnet18'], 'ptq_retinanet': ['retinanet']}
    plan = []
    for model in dict.fromkeys(m for s in steps for m in needs[s]):
        if not osp.isfile(osp.join(ROOT, ckpts[model])) and not osp.isfile(ckpts[model]):
            plan.append((f'train_{model}', train_command(model, args.mode, ckpts[model]), None))
            if MODES[args.mode]['train_iters']:
                ckpts[model] = osp.join(osp.dirname(ckpts[model]) or '.', f'iter_{MODES[args.mode]["train_iters"]}.pth')
    for s in steps:
        plan += commands(s, args.mode, ckpts, out_dir, args.jobs)
    if args.dry_run:
        for name, argv, _ in plan:
            print(f'{name}: ' + ' '.join(argv))
        return plan
    done, steps_file = {}, osp.join(out_dir, 'steps.json')
    env = environment()
    for k, (name, argv, result) in enumerate(plan):
        # qat.json grows run by run, so it is no sign of a finished step: qat_table skips its finished runs
        if args.resume and result and name != 'qat' and osp.isfile(osp.join(out_dir, result)):
            print(f'[{k + 1}/{len(plan)}] {name}: kept ({result})', flush=True)
            continue
        resumed = args.resume and name in RESUMES_ITSELF
        if resumed:
            argv = argv + ['--resume']
        print(f'[{k + 1}/{len(plan)}] {name} ...', flush=True)
        started = datetime.datetime.now().isoformat(timespec='seconds')
        rc, secs, text = run(name, argv, out_dir)
        done[name] = (rc, secs)
        # read again before writing: another sitting may run other steps into the same --out-dir meanwhile
        records = read_steps(steps_file)
        records[name] = dict(rc=rc, seconds=secs, resumed=resumed, commit=env['commit'], date=started)
        write_text_atomic(steps_file, json.dumps(records, indent=1))
        print(f'[{k + 1}/{len(plan)}] {name}: {"ok" if rc == 0 else f"FAILED (rc {rc}), see {out_dir}/{name}.log"} '
              f'({secs:.0f} s)', flush=True)
        if rc == 0 and name == 'latency':
            keep = ('|', 'onnxruntime ', 'kernel time per run', 'fastest of')   # the timing tables, the profile's
            table = [ln for ln in text.splitlines() if ln.startswith(keep)]
            table = [('\n' if ln.startswith(keep[2:]) else '') + ln for ln in table]
            write_text_atomic(osp.join(out_dir, 'latency.md'), '\n'.join(table) + '\n')
    text = report(out_dir, env, args.mode, read_steps(steps_file))
    write_text_atomic(osp.join(out_dir, 'results.md'), text)
    print(text)
    print(f'wrote {out_dir}/results.md')
    failed = [n for n, (rc, _) in done.items() if rc != 0]
    if failed:
        fail(f'steps failed: {", ".join(failed)} (logs in {out_dir})')
    return done


if __name__ == '__main__':
    main()
