"""Top-1 table of the quantization-aware training methods, each fine-tuned from one float checkpoint.

Every row is one ``tools/train.py`` run of a ready config (``configs/{prefix}_{method}_{bits}.py``)
in its own process and work dir, from the same float checkpoint, for the same number of epochs;
its top-1 is the validation (test-set) accuracy at the end of training. The float model's
accuracy comes from ``tools/test.py`` on the same checkpoint. Prints a Markdown table and, with
``--out``, writes the rows as JSON (atomically, after every run, so a long table survives an
interruption and ``--resume`` skips the rows it holds). ``--jobs N`` trains N runs at once, each in its own process
with ``cores // N`` threads (unless ``OMP_NUM_THREADS`` is set): on a 2-core machine two one-thread
runs finish a table in about half the time of one two-thread run after the other.

    python benchmarks/qat_table.py work_dirs/resnet18_fashionmnist/epoch_8.pth \\
        --runs lsq:w4a4,lsq:w2a2,bireal:w1a1 --epochs 1 --out qat.json
    # any extra --cfg-options go to every run, e.g. more data-loading workers on a big machine:
    python benchmarks/qat_table.py CKPT --cfg-options train_dataloader.num_workers=8
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
from mmquant.fileio import write_text_atomic  # noqa: E402  (a lock keeps the threads' saves apart)
DEFAULT_RUNS = ('dorefa:w4a4,pact:w4a4,lsq:w4a4,lqnet:w4a4,dorefa:w2a2,pact:w2a2,lsq:w2a2,lqnet:w2a2,'
                'xnor:w1a1,xnorpp:w1a1,bireal:w1a1,groupnet:w1a1')


def fail(msg: str):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint', help='float checkpoint every run starts from')
    p.add_argument('--prefix', default='resnet18_fashionmnist',
                   help='config family: configs/{prefix}.py (float) and configs/{prefix}_{method}_{bits}.py')
    p.add_argument('--runs', default=DEFAULT_RUNS, help='comma-separated method:bits')
    p.add_argument('--epochs', type=int, default=1, help='fine-tune epochs of every run')
    p.add_argument('--work-root', default='work_dirs/qat_table', help='one work dir per run below this')
    p.add_argument('--out', help='write the rows as JSON here')
    p.add_argument('--resume', action='store_true', help='keep the rows already in --out, run the rest')
    p.add_argument('--jobs', type=int, default=1,
                   help='training runs at once, each with cores // jobs threads unless OMP_NUM_THREADS is set')
    p.add_argument('--cfg-options', nargs='+', default=[], help='passed to every tools/train.py run')
    return p.parse_args(argv)


def check_runs(spec: str, prefix: str):
    runs = []
    for item in spec.split(','):
        method, _, bits = item.strip().partition(':')
        config = osp.join(ROOT, 'configs', f'{prefix}_{method}_{bits}.py')
        if not bits or not osp.isfile(config):
            fail(f'no ready config for run {item!r} (expected {osp.relpath(config, ROOT)}); '
                 f'runs look like lsq:w4a4, bireal:w1a1')
        runs.append((method, bits, config))
    return runs


def last_metric(work_dir: str, key: str):
    """The last value of ``key`` the run logged (mmengine's vis_data/scalars.json)."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')), key=osp.getmtime)
    value = None
    for path in files:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if key in row:
                    value = row[key]
    return value


def run(cmd, log_path, env=None):
    with open(log_path, 'w') as log:
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        return proc.returncode, time.time() - t


def float_top1(args, work_root):
    out = osp.join(work_root, 'float_metrics.json')
    config = osp.join(ROOT, 'configs', f'{args.prefix}.py')
    cmd = [sys.executable, 'tools/test.py', config, args.checkpoint, '--work-dir', osp.join(work_root, 'float'),
           '--out-metrics', out]
    if args.cfg_options:
        cmd += ['--cfg-options'] + [o for o in args.cfg_options if not o.startswith('train_')]
    rc, _ = run(cmd, osp.join(work_root, 'float.log'))
    if rc != 0:
        fail(f'testing the float checkpoint failed; see {osp.join(work_root, "float.log")}')
    with open(out) as f:
        return json.load(f)['metrics']['accuracy/top1']


def job_env(jobs: int):
    """The environment of one of ``jobs`` concurrent runs: the cores split between them."""
    if jobs == 1 or 'OMP_NUM_THREADS' in os.environ:
        return None
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))


def table(rows, fp):
    lines = [f'| method | bits | epochs | top-1 | vs FP ({fp:.2f}) | train wall (s) |', '|---|---|---|---|---|---|']
    for r in rows:
        top1 = 'failed' if r['top1'] is None else f'{r["top1"]:.2f}'
        delta = '' if r['top1'] is None else f'{r["top1"] - fp:+.2f}'
        lines.append(f'| {r["method"]} | {r["bits"].upper()} | {r["epochs"]} | {top1} | {delta} | {r["seconds"]:.0f} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        fail(f'float checkpoint {args.checkpoint!r} does not exist')
    if args.epochs < 1:
        fail(f'--epochs={args.epochs} must be >= 1')
    if args.jobs < 1:
        fail(f'--jobs={args.jobs} must be >= 1')
    runs = check_runs(args.runs, args.prefix)
    os.makedirs(args.work_root, exist_ok=True)
    rows = []
    if args.resume and args.out and osp.isfile(args.out):
        with open(args.out) as f:
            rows = json.load(f)['rows']
    done = {(r['method'], r['bits']) for r in rows}
    fp = rows[0]['fp_top1'] if rows else float_top1(args, args.work_root)
    print(f'float top-1 {fp:.2f}', flush=True)
    n = args.epochs
    order = {(m, b): i for i, (m, b, _) in enumerate(runs)}
    lock = threading.Lock()

    def train(item):
        method, bits, config = item
        work_dir = osp.join(args.work_root, f'{method}_{bits}')
        cmd = [sys.executable, 'tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
               f'load_from={args.checkpoint}', f'train_cfg.max_epochs={n}', f'train_cfg.val_interval={n}',
               f'param_scheduler.1.T_max={n}', f'param_scheduler.1.end={n}'] + list(args.cfg_options)
        rc, seconds = run(cmd, work_dir + '.log', job_env(args.jobs))
        top1 = last_metric(work_dir, 'accuracy/top1') if rc == 0 else None
        row = dict(method=method, bits=bits, epochs=n, top1=top1, seconds=seconds, fp_top1=fp,
                   config=osp.relpath(config, ROOT), returncode=rc, jobs=args.jobs)
        with lock:                                  # rows kept in the order of --runs, saved after every run
            rows.append(row)
            rows.sort(key=lambda r: order.get((r['method'], r['bits']), -1))
            print(f'{method} {bits}: top-1 {top1} ({seconds:.0f} s)' +
                  ('' if rc == 0 else f', failed, see {work_dir}.log'), flush=True)
            if args.out:
                write_text_atomic(args.out, json.dumps(dict(checkpoint=args.checkpoint, rows=rows), indent=2))

    todo = [r for r in runs if (r[0], r[1]) not in done]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, todo))                 # list(): a failure inside a job is raised here
    print(table(rows, fp))
    return rows


if __name__ == '__main__':
    main()
