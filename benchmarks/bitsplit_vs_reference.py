"""Time mmquant's BitSplit solver against the authors' published NumPy implementation.

Both solve the same problem (the same float32 weights ``W [C_out, D]``, im2col inputs
``X [K, D]`` and outputs ``Y = X W^T``) under the same thread count, and the table reports the
wall time of each, the speed-up and the relative output error ``||Y - X Wq^T||^2 / ||Y||^2`` of
both (and of round-to-nearest), so that the speed is compared at equal or better quality.

    python benchmarks/bitsplit_vs_reference.py --reference /path/to/BitSplit
    python benchmarks/bitsplit_vs_reference.py --reference ref --shapes 64x64x3 128x128x3 \\
        --samples 4096 15000 --ref-epochs 10 --threads 1 --out bench.json

The reference is not vendored and never downloaded by this script: pass a local checkout of the
authors' repository (``git clone https://github.com/peiswang/BitSplit DIR``; tested at commit
ed8a8eee65ac54bd32f002c107ea55352a192012). Only its ``quant.py`` is loaded, a NumPy-only module,
from the file with :mod:`importlib`; its functions are called unchanged:

* ``ofwa(W, bitwidth)`` (weight-only fit from the ALS-refined round-to-nearest start, at its own
  default of at most 50 epochs), then
* ``ofwa_rr(X, Y, B_sav, alpha, bitwidth, max_epoch)`` (response fit), with ``max_epoch=100`` as
  in the authors' ResNet-18 scripts (``--ref-epochs``; they sample 15000 patches per layer).

The one adaptation: ``quant.split`` uses ``np.int``, which NumPy removed in 1.24, so the module's
global ``np`` is replaced by a copy of NumPy's namespace that adds ``int`` (the builtin it
aliased). Their ``ofwa_rr`` has no early exit, so every epoch costs the same; with
``--ref-epochs`` below 100 the table also extrapolates their time at 100 epochs (measured ``ofwa``
+ ``X^T X`` + 100 x the measured per-epoch time; marked ``~``); the errors are always those of the
epochs actually run.

Ours is ``fit_layer(W, X^T, bits, per_channel=True, iters, y=Y^T, tol)``: stage 1, then
response rounds of one closed-form scale and one coordinate-descent sweep per bit plane each, the
counterpart of one ``ofwa_rr`` epoch. It runs twice: at its own defaults (``--iters 4``,
``--tol 1e-4``: it stops early once a round gains less than ``tol``, relative), timed against the
reference at its 100 epochs ("speed-up"), and at the reference's epoch count with ``tol=0`` (it
stops only when a round gains nothing), timed against the reference run ("equal-rounds
speed-up"). The table shows the rounds each run made. Nothing is written except ``--out`` (JSON,
written atomically).
"""
import argparse
import os
import os.path as osp
import sys

REF_URL = 'https://github.com/peiswang/BitSplit'
REF_DEFAULT_EPOCHS = 100           # max_epoch of ofwa_rr in the authors' main_quant_resnet18_*.py
REF_DEFAULT_SAMPLES = 15000        # n_samples of their _conv_hook_
OURS_DEFAULT_ITERS = 4             # BitSplitPTQ(iters=4)

# ResNet-18's distinct conv shapes (C_out, C_in, k): stem, the 3x3 convs, the 1x1 downsamples.
RESNET18_SHAPES = ['64x3x7', '64x64x3', '128x64x3', '128x128x3', '256x128x3', '256x256x3',
                   '512x256x3', '512x512x3', '128x64x1', '256x128x1', '512x256x1']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reference', required=True, metavar='DIR',
                   help=f'local checkout of the authors\' code (git clone {REF_URL} DIR)')
    p.add_argument('--bits', type=int, default=4, help='weight bits (>= 3; default 4)')
    p.add_argument('--samples', type=int, nargs='+', default=[4096, REF_DEFAULT_SAMPLES],
                   help='im2col samples per layer (default 4096 15000)')
    p.add_argument('--shapes', nargs='+', default=RESNET18_SHAPES,
                   help='COUTxCINxK (conv, D = CIN*K*K) or COUTxD (D independent inputs); '
                        'default: the distinct ResNet-18 conv shapes')
    p.add_argument('--threads', type=int, default=1, help='BLAS / torch threads (default 1)')
    p.add_argument('--repeat', type=int, default=1, help='timed runs of each, best kept (default 1)')
    p.add_argument('--ref-epochs', type=int, default=REF_DEFAULT_EPOCHS,
                   help=f'max_epoch of the reference ofwa_rr (default {REF_DEFAULT_EPOCHS}, theirs)')
    p.add_argument('--iters', type=int, default=OURS_DEFAULT_ITERS,
                   help=f'response rounds of ours (default {OURS_DEFAULT_ITERS}, BitSplitPTQ\'s default)')
    p.add_argument('--tol', type=float, default=1e-4, help='early-stop tolerance of ours (default 1e-4)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='also write the results as JSON here')
    args = p.parse_args(argv)
    if args.bits < 3:
        p.error('--bits must be >= 3 (the reference asserts it)')
    if args.threads < 1 or args.repeat < 1 or args.ref_epochs < 1 or min(args.samples) < 1:
        p.error('--threads, --repeat, --ref-epochs and --samples must be >= 1')
    if args.iters < 0:
        p.error('--iters must be >= 0')
    args.shapes = [parse_shape(s, p) for s in args.shapes]
    return args


def parse_shape(text, parser=None):
    """``'512x512x3'`` -> ``(512, 512, 3)``; ``'128x576'`` -> ``(128, 576, 1)`` (D inputs)."""
    try:
        parts = [int(t) for t in text.lower().split('x')]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or min(parts) < 1:
        msg = f'bad shape {text!r}: use COUTxCINxK or COUTxD'
        if parser is None:
            raise ValueError(msg)
        parser.error(msg)
    return tuple(parts) if len(parts) == 3 else (parts[0], parts[1], 1)


def reference_file(ref_dir):
    """``DIR/quant.py``, or None."""
    path = osp.join(ref_dir, 'quant.py')
    return path if osp.isfile(path) else None


# --------------------------------------------------------------------------- everything below needs numpy / torch
def load_reference(path):
    """Load the authors' ``quant.py`` as a module; point its ``np`` at NumPy plus ``np.int``."""
    import importlib.util
    import types

    import numpy

    spec = importlib.util.spec_from_file_location('bitsplit_reference_quant', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ('ofwa', 'ofwa_rr'):
        if not callable(getattr(mod, name, None)):
            raise SystemExit(f'error: {path} has no function {name}(); is it the BitSplit checkout ({REF_URL})?')
    if not hasattr(numpy, 'int'):   # a copy of numpy's namespace: plain lookups, no call overhead
        shim = types.ModuleType('numpy')
        shim.__dict__.update(numpy.__dict__)
        shim.int = int
        mod.np = shim
    return mod


def make_problem(shape, n_samples, seed):
    """Float32 ``W [C, D]`` (He-normal), ``X [K, D]`` (im2col patches of spatially smoothed,
    channel-scaled ReLU'd Gaussian feature maps, padding ``k // 2``) and ``Y = X W^T``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    c_out, c_in, k = shape
    d = c_in * k * k
    gen = torch.Generator().manual_seed(seed * 1000003 + c_out * 7919 + d * 31 + n_samples)
    w = torch.randn(c_out, d, generator=gen) * (2.0 / d) ** 0.5
    hw = 8 if k > 1 else 1
    n_img = -(-n_samples // (hw * hw))
    maps = torch.randn(n_img, c_in, hw + 2, hw + 2, generator=gen)
    if k > 1:   # neighbouring positions correlated, as in real feature maps
        maps = F.avg_pool2d(maps, 3, stride=1)
    else:
        maps = maps[:, :, 1:-1, 1:-1]
    scale = torch.exp(0.5 * torch.randn(1, c_in, 1, 1, generator=gen))
    maps = torch.relu(maps * scale + 0.2 * scale)
    cols = F.unfold(maps, k, padding=k // 2)                      # [n_img, D, hw*hw]
    cols = cols.transpose(1, 2).reshape(-1, d)
    pick = torch.randperm(cols.shape[0], generator=gen)[:n_samples]
    x = np.ascontiguousarray(cols[pick].numpy(), dtype=np.float32)
    w = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    y = x @ w.T                                                    # float32, like the conv output
    return w, x, y


def rel_error(x, y, wq):
    """``||Y - X Wq^T||^2 / ||Y||^2`` in float64."""
    import numpy as np
    y64 = y.astype(np.float64)
    res = y64 - x.astype(np.float64) @ np.asarray(wq, dtype=np.float64).T
    return float((res ** 2).sum() / max((y64 ** 2).sum(), 1e-300))


def rtn_weight(w, bits):
    import numpy as np
    q = 2 ** (bits - 1) - 1
    a = np.maximum(np.abs(w).max(1, keepdims=True) / q, 1e-12)
    return np.clip(np.round(w / a), -q, q) * a


def best_of(fn, repeat):
    """``(best seconds, result of the last run)``."""
    import time
    best, out = float('inf'), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_reference(ref, w, x, y, bits, epochs, repeat):
    """Their two calls, timed apart; returns ``(t_ofwa, t_rr, weight)``."""
    import numpy as np
    t_ofwa = t_rr = float('inf')
    wq = None
    for _ in range(repeat):   # ofwa_rr changes B_sav in place: a fresh ofwa for every run
        t1, (b_sav, _, alpha) = best_of(lambda: ref.ofwa(w, bits), 1)
        t2, (b_sum, alpha) = best_of(lambda: ref.ofwa_rr(x, y, b_sav, alpha, bits, max_epoch=epochs), 1)
        if t1 + t2 < t_ofwa + t_rr:
            t_ofwa, t_rr = t1, t2
        wq = np.asarray(b_sum, dtype=np.float64) * np.asarray(alpha, dtype=np.float64)[:, None]
    return t_ofwa, t_rr, wq


def run_ours(w, x, y, bits, iters, tol, repeat):
    import torch

    from mmquant.ptq.bitsplit_solver import fit_layer
    wt, xt, yt = torch.from_numpy(w), torch.from_numpy(x).T, torch.from_numpy(y).T   # views, no copies
    t, res = best_of(lambda: fit_layer(wt, xt, bits, per_channel=True, iters=iters, y=yt, tol=tol), repeat)
    return t, res.weight[0].double().numpy(), len(res.history) - 1


def bench_one(ref, shape, n_samples, args):
    import numpy as np
    c_out, c_in, k = shape
    w, x, y = make_problem(shape, n_samples, args.seed)
    t_gram, _ = best_of(lambda: np.dot(x.T, x), 1)     # the one-off part of ofwa_rr, for extrapolation
    t_ofwa, t_rr, wq_ref = run_reference(ref, w, x, y, args.bits, args.ref_epochs, args.repeat)
    t_ours, wq_ours, rounds = run_ours(w, x, y, args.bits, args.iters, args.tol, args.repeat)
    # ours at the reference's epoch count, no early stop: the same number of alternations
    t_eq, wq_eq, rounds_eq = run_ours(w, x, y, args.bits, args.ref_epochs, 0.0, args.repeat)
    t_ref = t_ofwa + t_rr
    per_epoch = max(t_rr - t_gram, 0.0) / args.ref_epochs
    t_ref_default = t_ref if args.ref_epochs == REF_DEFAULT_EPOCHS else \
        t_ofwa + t_gram + REF_DEFAULT_EPOCHS * per_epoch
    return {
        'c_out': c_out, 'c_in': c_in, 'k': k, 'd': c_in * k * k, 'samples': n_samples,
        'ref_epochs': args.ref_epochs, 'ref_s': t_ref, 'ref_ofwa_s': t_ofwa, 'ref_rr_s': t_rr,
        'ref_gram_s': t_gram, 'ref_epoch_s': per_epoch, 'ref_s_at_100_epochs': t_ref_default,
        'ref_s_at_100_epochs_extrapolated': args.ref_epochs != REF_DEFAULT_EPOCHS,
        'ours_iters': args.iters, 'ours_tol': args.tol, 'ours_rounds': rounds, 'ours_s': t_ours,
        'ours_eq_rounds': rounds_eq, 'ours_eq_s': t_eq,
        'speedup_vs_ref_100_epochs': t_ref_default / t_ours, 'speedup_equal_rounds': t_ref / t_eq,
        'err_rtn': rel_error(x, y, rtn_weight(w, args.bits)), 'err_ref': rel_error(x, y, wq_ref),
        'err_ours': rel_error(x, y, wq_ours), 'err_ours_eq': rel_error(x, y, wq_eq),
    }


def markdown(rows, ref_epochs):
    """One row per problem. ``~`` marks the reference time extrapolated to its 100 epochs."""
    e = ref_epochs
    head = ['layer C_out x D', 'K', 'ref s @100 ep', 'ours s (rounds)', 'speed-up', f'ref s ({e} ep)',
            f'ours s ({e} rounds, tol 0)', 'equal-rounds speed-up', 'err RTN', 'err ref @100 ep' if
            e == REF_DEFAULT_EPOCHS else f'err ref @{e} ep', 'err ours', f'err ours @{e} rounds']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        geo = f"{r['c_out']}x{r['d']}" + (f" ({r['c_in']}*{r['k']}*{r['k']})" if r['k'] > 1 else '')
        mark = '~' if r['ref_s_at_100_epochs_extrapolated'] else ''
        cells = [geo, str(r['samples']), f"{mark}{r['ref_s_at_100_epochs']:.1f}",
                 f"{r['ours_s']:.3f} ({r['ours_rounds']})", f"{mark}{r['speedup_vs_ref_100_epochs']:.0f}x",
                 f"{r['ref_s']:.2f}", f"{r['ours_eq_s']:.3f} ({r['ours_eq_rounds']})",
                 f"{r['speedup_equal_rounds']:.2f}x"]
        cells += [f"{r[k]:.3e}" for k in ('err_rtn', 'err_ref', 'err_ours', 'err_ours_eq')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def write_json_atomic(path, obj):
    import json
    import tempfile
    folder = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    args = parse_args(argv)
    path = reference_file(args.reference)
    if path is None:
        sys.stderr.write(f'error: no BitSplit reference checkout at {args.reference} (its quant.py is '
                         f'missing); get it with: git clone {REF_URL} {args.reference}\n')
        return 2
    # thread counts before numpy / torch are imported (their BLAS pools start on import)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    ref = load_reference(path)
    load0 = os.getloadavg()
    print(f'# BitSplit: mmquant fit_layer vs reference {path}; W{args.bits}, per-channel alpha, '
          f'float32 inputs; threads={args.threads} (cores: {os.cpu_count()}), repeat={args.repeat} '
          f'(best), ref max_epoch={args.ref_epochs}, ours iters<={args.iters} tol={args.tol}; '
          f'numpy {np.__version__}, torch {torch.__version__}; load average {load0[0]:.2f} {load0[1]:.2f} '
          f'{load0[2]:.2f}', flush=True)
    rows = []
    for shape in args.shapes:
        for n in args.samples:
            r = bench_one(ref, shape, n, args)
            rows.append(r)
            print(f"#   {r['c_out']}x{r['d']} K={n}: ref {r['ref_s']:.2f}s ({args.ref_epochs} ep) err "
                  f"{r['err_ref']:.3e} | ours {r['ours_s']:.3f}s ({r['ours_rounds']} rounds) err "
                  f"{r['err_ours']:.3e} | ours {r['ours_eq_s']:.3f}s ({r['ours_eq_rounds']} rounds) err "
                  f"{r['err_ours_eq']:.3e}", flush=True)
    load1 = os.getloadavg()
    print(f'# load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}')
    print(markdown(rows, args.ref_epochs))
    if args.out:
        write_json_atomic(args.out, {'args': {k: v for k, v in vars(args).items()}, 'reference': path,
                                     'numpy': np.__version__, 'torch': torch.__version__,
                                     'loadavg_start': load0, 'loadavg_end': load1, 'rows': rows})
    return 0


if __name__ == '__main__':
    sys.exit(main())
