"""Training step time of every QAT method against the float model, on this machine.

One real training batch (the config's train pipeline), one process; the float model and one
model per ``method:bits`` are built from the config (QAT: ``QuantizedModel`` with that method)
and their quantizers initialised on the batch. Then full SGD steps (data preprocessor, loss,
backward, optimizer step) are timed round-robin, one step of every model per round, so that a
drift of the machine's speed (other jobs, clocks, the allocator) hits all models alike. Prints
the median step time and its ratio to the float step.

    python benchmarks/qat_step_time.py configs/resnet18_fashionmnist.py --threads 2 --steps 10
"""
import argparse
import statistics
import sys
import time
import warnings
import os.path as osp

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401
from mmquant.qat import QAT_METHODS  # noqa: E402
from mmquant.qconfig import parse_bits  # noqa: E402

DEFAULT = ('dorefa:w4a4,pact:w4a4,lsq:w4a4,lqnet:w4a4,dorefa:w2a2,pact:w2a2,lsq:w2a2,lqnet:w2a2,'
           'xnor:w1a1,xnorpp:w1a1,bireal:w1a1,groupnet:w1a1')


def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='a float training config (e.g. configs/resnet18_fashionmnist.py)')
    p.add_argument('--methods', default=DEFAULT, help='comma-separated method:bits')
    p.add_argument('--steps', type=int, default=10, help='timed steps per model (after --warmup)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    return p.parse_args(argv)


def check_methods(spec):
    runs = []
    for item in spec.split(','):
        method, _, bits = item.strip().partition(':')
        if method not in QAT_METHODS:
            fail(f'unknown QAT method {method!r} in {item!r}; accepted: {", ".join(sorted(QAT_METHODS))}')
        try:
            parse_bits(bits, binary=True)
        except ValueError as e:
            fail(str(e))
        runs.append((method, bits))
    return runs


class Stepper:
    """One model and its optimizer; ``step()`` runs one training step and returns its seconds."""

    def __init__(self, model, batch):
        self.model, self.batch = model.train(), batch
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        self.times = []

    def step(self) -> float:
        t = time.perf_counter()
        data = self.model.data_preprocessor(self.batch, True)
        loss, _ = self.model.parse_losses(self.model(**data, mode='loss'))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.config):
        fail(f'config {args.config!r} does not exist')
    runs = check_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    loader_cfg = dict(cfg.train_dataloader, batch_size=args.batch, num_workers=0, persistent_workers=False)
    batch = next(iter(Runner.build_dataloader(loader_cfg)))
    torch.manual_seed(0)
    names = [('float', '')] + runs
    steppers = [Stepper(MODELS.build(cfg.model), batch)]
    for method, bits in runs:
        steppers.append(Stepper(MODELS.build(dict(type='QuantizedModel', architecture=cfg.model,
                                                  method=method, bits=bits)), batch))
    for r in range(args.warmup + args.steps):   # the first step initialises the quantizers
        for s in steppers:
            t = s.step()
            if r >= args.warmup:
                s.times.append(t)
    base = statistics.median(steppers[0].times)
    rows = [(m, b, statistics.median(s.times)) for (m, b), s in zip(names, steppers)]
    print(f'\nbatch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup}')
    print('| method | bits | step (s) | vs float |\n|---|---|---|---|')
    for method, bits, t in rows:
        print(f'| {method} | {bits.upper()} | {t:.3f} | {t / base:.2f}x |')
    return rows


if __name__ == '__main__':
    main()
