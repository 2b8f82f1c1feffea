"""benchmarks/bitsplit_vs_reference.py without the authors' checkout: a one-line error naming the
clone command, and the benchmark's own plumbing on a stand-in reference module."""
import importlib.util
import json
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'benchmarks', 'bitsplit_vs_reference.py')


def _load_script():
    spec = importlib.util.spec_from_file_location('bitsplit_vs_reference', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_reference_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / 'no_checkout')
    proc = subprocess.run([sys.executable, SCRIPT, '--reference', missing], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f'git clone https://github.com/peiswang/BitSplit {missing}' in lines[0]
    assert not osp.exists(missing)


def test_shape_parsing():
    bench = _load_script()
    assert bench.parse_shape('512x512x3') == (512, 512, 3)
    assert bench.parse_shape('128X576') == (128, 576, 1)
    for bad in ('512', '0x3', 'axb', '1x2x3x4'):
        with pytest.raises(ValueError):
            bench.parse_shape(bad)
    assert all(len(bench.parse_shape(s)) == 3 for s in bench.RESNET18_SHAPES)


# A stand-in with the reference's call interface (not its algorithm): round-to-nearest, and a
# response step that keeps the integers and refits only the per-channel scale.
_STANDIN = '''
import numpy as np

def ofwa(W, bitwidth, max_epoch=50):
    top = 2 ** (bitwidth - 1) - 1
    alpha = np.abs(W).max(axis=1) / top
    ints = np.clip(np.round(W / alpha[:, None]), -top, top)
    return [ints], ints, alpha

def ofwa_rr(X, Y, B_sav, alpha, bitwidth, max_epoch=100):
    ints = B_sav[0]
    XB = X.reshape(X.shape[0], -1) @ ints.T
    return ints, (Y * XB).sum(0) / (XB * XB).sum(0)
'''


def test_table_and_json_with_a_standin_reference(tmp_path, capsys, monkeypatch):
    import torch
    (tmp_path / 'quant.py').write_text(_STANDIN)
    out = tmp_path / 'bench.json'
    bench = _load_script()
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):   # main() sets them
        monkeypatch.setenv(var, '1')
    monkeypatch.setattr(torch, 'set_num_threads', lambda n: None)   # and leaves this session's alone
    rc = bench.main(['--reference', str(tmp_path), '--shapes', '8x4x3', '16x12', '--samples', '64',
                     '--ref-epochs', '2', '--iters', '2', '--out', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert '| layer C_out x D | K |' in text and '| 8x36 (4*3*3) | 64 |' in text and '| 16x12 | 64 |' in text
    data = json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bench.json', 'quant.py']   # no temp file left
    rows = data['rows']
    assert [(r['c_out'], r['d'], r['samples']) for r in rows] == [(8, 36, 64), (16, 12, 64)]
    for r in rows:
        assert r['ref_s_at_100_epochs_extrapolated'] and r['ours_rounds'] <= 2
        assert 0 <= r['err_ours'] <= r['err_rtn'] * (1 + 1e-4)   # the fit never loses to its RTN start
        assert 0 <= r['err_ref'] <= r['err_rtn'] * (1 + 1e-4)    # nor does the stand-in's scale refit


def test_brecq_benchmark_without_the_reference_is_a_one_line_error(tmp_path):
    script = osp.join(ROOT, 'benchmarks', 'brecq_vs_reference.py')
    missing = str(tmp_path / 'no_checkout')
    proc = subprocess.run([sys.executable, script, 'cfg.py', 'ckpt.pth', '--reference', missing],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f'git clone https://github.com/yhhhli/BRECQ {missing}' in lines[0]


def test_brecq_benchmark_table_compares_the_common_units(capsys):
    spec = importlib.util.spec_from_file_location('brecq_vs_reference',
                                                  osp.join(ROOT, 'benchmarks', 'brecq_vs_reference.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.print_table(dict(bits='w2a4', iters=100, calib_images=64, threads=1, fp=90.0,
                           reference=dict(seconds=5.0, top1=80.0, units={'a': dict(seconds=2.0, iters=125)}),
                           ours=dict(seconds=3.0, top1=81.0, units={'stem': dict(seconds=1.0, iters=100),
                                                                     'a': dict(seconds=1.0, iters=100)})))
    out = capsys.readouterr().out
    assert '| a | 2.0 (125, 16.0) | 1.0 (100, 10.0) | 1.60x |' in out
    assert '| stem | - | 1.0 (100, 10.0) | - |' in out
    assert '| the 1 units reference and ours reconstruct | 2.0 (125, 16.0) | 1.0 (100, 10.0) | 1.60x |' in out
