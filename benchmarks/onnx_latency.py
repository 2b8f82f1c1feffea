"""onnxruntime latency of exported models against the float model, on this machine.

The float checkpoint is exported as plain FP32 ONNX (same input and output as tools/export.py's
graphs); then every model is timed in onnxruntime's CPU provider on random inputs of the test
image size at each batch size: median over ``--runs`` runs after ``--warmup``, models interleaved
run by run so a drift of the machine hits all alike.

    python benchmarks/onnx_latency.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/epoch_8.pth \\
        r18_w8a8.onnx r18_w4a4.onnx --batch 1,32 --threads 2
"""
import argparse
import os.path as osp
import statistics
import sys
import tempfile
import time
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402

from mmquant.engine.ptq_loop import TensorMode  # noqa: E402


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
    return p.parse_args(argv)


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
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    names = ['fp32'] + [osp.basename(m) for m in args.models]
    sessions = [ort.InferenceSession(p, opts, providers=['CPUExecutionProvider']) for p in [fp32] + args.models]
    print(f'onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs} runs after {args.warmup}')
    print('| model | ' + ' | '.join(f'batch {b} (ms)' for b in batches) + ' | ' +
          ' | '.join(f'vs fp32 @{b}' for b in batches) + ' |')
    print('|---' * (1 + 2 * len(batches)) + '|')
    table = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, ) + tuple(example.shape[1:])).astype(np.float32)
        times = [[] for _ in sessions]
        for r in range(args.warmup + args.runs):
            for i, s in enumerate(sessions):
                t = time.perf_counter()
                s.run(None, {'input': x})
                if r >= args.warmup:
                    times[i].append(time.perf_counter() - t)
        for i, name in enumerate(names):
            table.setdefault(name, {})[b] = 1000 * statistics.median(times[i])
    for name in names:
        row = table[name]
        print(f'| {name} | ' + ' | '.join(f'{row[b]:.2f}' for b in batches) + ' | ' +
              ' | '.join(f'{table["fp32"][b] / row[b]:.2f}x' for b in batches) + ' |')
    return table


if __name__ == '__main__':
    main()
