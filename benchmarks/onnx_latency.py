"""onnxruntime latency of exported models against the float model, on this machine.

The float checkpoint is exported as plain FP32 ONNX (same input and output as tools/export.py's
graphs, and the same cut of the kernel taps that read only padding: mmquant.export.pad_taps);
then every model is timed in onnxruntime's CPU provider on random inputs of the test image size
at each batch size: median (and fastest) of ``--runs`` runs after ``--warmup``. The models take
turns in blocks of 10 runs, so a drift of the machine hits all alike, and each block starts after
a 50 ms sleep and one untimed run: onnxruntime's intra-op threads spin for a while after a run (its
default, kept: it is how a deployed model runs), and turns of one run each let the previous model's
spinning threads take the cores from the next one (on 2 cores the FP32 median at batch 32 doubled,
from 14 ms alone to 32 ms interleaved run by run, measured here).

    python benchmarks/onnx_latency.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/epoch_8.pth \\
        r18_w8a8.onnx r18_w4a4.onnx --batch 1,32 --threads 2
"""
import argparse
import json
import os.path as osp
import re
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402

from mmquant.engine.ptq_loop import TensorMode  # noqa: E402
from mmquant.export import prune_padding_taps  # noqa: E402


def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help='float checkpoint (exported as the FP32 baseline)')
    p.add_argument('models', nargs='*', help='ONNX files from tools/export.py')
    p.add_argument('--batch', default='1,32', help='comma-separated batch sizes')
    p.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads')
    p.add_argument('--runs', type=int, default=50)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--profile', action='store_true',
                   help='also time every kernel with onnxruntime\'s profiler and print where the time goes: '
                        'per stage (layerN), other convolutions (the stem) and other ops, against fp32')
    return p.parse_args(argv)


BLOCK = 10   # timed runs of one model in a row
PARK = 0.05  # seconds of sleep before each block


CONV_OPS = ('Conv', 'FusedConv', 'QLinearConv', 'ConvInteger', 'NhwcFusedConv')
STAGE = re.compile(r'(layer\d+|stage\d+|features\.\d+)')


def kernel_groups(profile_events, runs):
    """Kernel milliseconds per run, from onnxruntime's profile, over its last ``runs`` runs (the
    warm-up before them left out), by group: the stage the node's name names (``layer3``), else
    ``other convs`` / ``other ops``."""
    windows = [(e['ts'], e['ts'] + e['dur']) for e in profile_events if e.get('name') == 'model_run'][-runs:]
    out = {}
    for e in profile_events:
        if e.get('cat') != 'Node' or not e['name'].endswith('_kernel_time'):
            continue
        if not any(a <= e['ts'] <= b for a, b in windows):
            continue
        m = STAGE.search(e['name'])
        group = m.group(1) if m else ('other convs' if e['args']['op_name'] in CONV_OPS else 'other ops')
        out[group] = out.get(group, 0.0) + e['dur'] / 1000 / len(windows)
    return out


def profile(paths, names, opts, x, runs, warmup):
    """Print a table: kernel ms per group for each model, with the first's (fp32) time over it."""
    import onnxruntime as ort
    per_model = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, path in enumerate(paths):
            opts.enable_profiling = True
            opts.profile_file_prefix = osp.join(tmp, f'model{k}')
            sess = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
            for _ in range(warmup + runs):
                sess.run(None, {'input': x})
            with open(sess.end_profiling()) as f:
                per_model.append(kernel_groups(json.load(f), runs))
    opts.enable_profiling = False
    keys = sorted({k for g in per_model for k in g}, key=lambda k: (not STAGE.fullmatch(k), k))
    print(f'\nkernel time per run (ms, onnxruntime profiler, batch {x.shape[0]}; ratio: fp32 / model)')
    print('| group | ' + ' | '.join(names) + ' |')
    print('|---' * (1 + len(names)) + '|')
    for k in keys + ['all kernels']:
        vals = [sum(g.values()) if k == 'all kernels' else g.get(k, 0.0) for g in per_model]
        cells = ['-' if not v else f'{v:.2f}' if i == 0 else f'{v:.2f} ({vals[0] / v:.2f}x)' for i, v in enumerate(vals)]
        print(f'| {k} | ' + ' | '.join(cells) + ' |')
    return per_model


def print_table(ms, batches):
    """``ms[model][batch]`` as a markdown table with each model's speed-up over fp32."""
    print('| model | ' + ' | '.join(f'batch {b} (ms)' for b in batches) + ' | ' +
          ' | '.join(f'vs fp32 @{b}' for b in batches) + ' |')
    print('|---' * (1 + 2 * len(batches)) + '|')
    for name, row in ms.items():
        print(f'| {name} | ' + ' | '.join(f'{row[b]:.2f}' for b in batches) + ' | ' +
              ' | '.join(f'{ms["fp32"][b] / row[b]:.2f}x' for b in batches) + ' |')


def main(argv=None):
    args = parse_args(argv)
    for path in [args.config, args.checkpoint] + args.models:
        if not osp.isfile(path):
            fail(f'{path!r} does not exist')
    try:
        batches = [int(b) for b in args.batch.split(',')]
    except ValueError:
        fail(f'--batch {args.batch!r}: expected comma-separated integers, e.g. 1,32')
    import onnxruntime as ort
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model = MODELS.build(cfg.model).eval()
    load_checkpoint(model, args.checkpoint, map_location='cpu', logger='silent')
    loader = Runner.build_dataloader(dict(cfg.test_dataloader, num_workers=0, persistent_workers=False))
    example = model.data_preprocessor(next(iter(loader)), False)['inputs'][:1]

    tmp = tempfile.mkdtemp()
    fp32 = osp.join(tmp, 'fp32.onnx')
    with torch.no_grad():
        torch.onnx.export(TensorMode(model), (example, ), fp32, opset_version=17, dynamo=False, input_names=['input'],
                          output_names=['output'], dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})
    # the same cut of padding-only kernel taps as tools/export.py's graphs get, so the baseline is like for like
    onnx.save(prune_padding_taps(onnx.load(fp32))[0], fp32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    names = ['fp32'] + [osp.basename(m) for m in args.models]
    sessions = [ort.InferenceSession(p, opts, providers=['CPUExecutionProvider']) for p in [fp32] + args.models]
    table, best = {}, {}
    inputs = {b: np.random.default_rng(0).standard_normal((b, ) + tuple(example.shape[1:])).astype(np.float32)
              for b in batches}
    for b, x in inputs.items():
        times = [[] for _ in sessions]
        for s in sessions:
            for _ in range(args.warmup):
                s.run(None, {'input': x})
        done = 0
        while done < args.runs:                 # rounds of blocks: model after model, each block a few runs
            n = min(BLOCK, args.runs - done)
            for i, s in enumerate(sessions):
                time.sleep(PARK)                # the last model's threads stop spinning (module doc)
                s.run(None, {'input': x})       # untimed
                for _ in range(n):
                    t = time.perf_counter()
                    s.run(None, {'input': x})
                    times[i].append(time.perf_counter() - t)
            done += n
        for i, name in enumerate(names):
            table.setdefault(name, {})[b] = 1000 * statistics.median(times[i])
            best.setdefault(name, {})[b] = 1000 * min(times[i])
    print(f'onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs} runs after {args.warmup}')
    print_table(table, batches)
    # the fastest run: what the machine gives when nothing else wakes up
    print(f'\nfastest of the {args.runs} runs')
    print_table(best, batches)
    if args.profile:
        for x in inputs.values():
            profile([fp32] + args.models, names, opts, x, args.runs, args.warmup)
    return table


if __name__ == '__main__':
    main()
