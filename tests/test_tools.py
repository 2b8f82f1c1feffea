"""End to end on real Fashion-MNIST images: train a few iterations, post-training quantize with
tools/test.py, reload the quantized checkpoint without calibrating, fake-quant training with
tools/train.py, config-only use through custom_imports, and the CLI's one-line errors."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

import mmquant  # noqa: F401  (allow-lists the classes of OpenMMLab checkpoints)

from conftest import ROOT, write_config

TINY = """
_base_ = ['{root}/configs/resnet18_fashionmnist.py']
data_root = '{data}'
train_dataloader = dict(batch_size=32, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, indices=2048))
val_dataloader = dict(batch_size=64, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, indices=256))
test_dataloader = val_dataloader
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=30, val_interval=1000)
param_scheduler = []
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=30), logger=dict(interval=10))
"""


def run_tool(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


@pytest.fixture(scope='module')
def float_run(tmp_path_factory, fashion_mnist):
    tmp = tmp_path_factory.mktemp('e2e')
    cfg = write_config(tmp, TINY.format(root=ROOT, data=fashion_mnist))
    work = tmp / 'float'
    run_tool('tools/train.py', cfg, '--work-dir', str(work))
    ckpt = (work / 'last_checkpoint').read_text().strip()
    return tmp, cfg, ckpt


def read(path):
    with open(path) as f:
        return json.load(f)


def test_ptq_then_reload_without_calibration(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'ptq'
    run_tool('tools/test.py', cfg, ckpt, '--quant', 'minmax', '--quant-bits', 'w4a8', '--calib-images', '64',
             '--work-dir', str(out), '--out-metrics', str(out / 'm.json'))
    first = read(out / 'm.json')
    assert first['method'] == 'minmax' and first['bits'] == 'w4a8' and first['calib_seconds'] > 0
    qckpt = first['quantized_checkpoint']
    assert qckpt == str(out / 'minmax_w4a8.pth') and osp.isfile(qckpt)
    meta = torch.load(qckpt, weights_only=True)['meta']['mmquant']
    assert meta['first_layers'] == ['backbone.conv1'] and meta['last_layers'] == ['head.fc']

    again = tmp / 'reload'
    proc = run_tool('tools/test.py', cfg, qckpt, '--work-dir', str(again), '--out-metrics', str(again / 'm.json'))
    second = read(again / 'm.json')
    assert second['calib_seconds'] is None and 'restored calibrated quantizers' in proc.stdout + proc.stderr
    assert second['metrics'] == first['metrics']

    fp = tmp / 'fp'
    run_tool('tools/test.py', cfg, ckpt, '--work-dir', str(fp), '--out-metrics', str(fp / 'm.json'))
    assert 'method' not in read(fp / 'm.json')


def test_export_qdq_of_a_ptq_checkpoint_matches_in_onnxruntime(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'export'
    result = run_tool('tools/test.py', cfg, ckpt, '--quant', 'minmax', '--quant-bits', 'w4a8', '--calib-images', '32',
                      '--work-dir', str(out), '--out-metrics', str(out / 'm.json'))
    qckpt = read(out / 'm.json')['quantized_checkpoint']
    onnx_path = out / 'model.onnx'
    proc = run_tool('tools/export.py', cfg, qckpt, '--format', 'qdq', '--out', str(onnx_path), '--check-images', '64',
                    '--work-dir', str(out / 'exp'))
    assert onnx_path.is_file() and not list(out.glob('*.tmp'))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('onnxruntime vs PyTorch on 64 test images')]
    assert line, proc.stdout[-2000:]
    top1 = re.findall(r'([0-9.]+) \((?:onnxruntime|PyTorch)', line[0])
    assert len(top1) == 2 and top1[0] == top1[1]        # the same predictions on every image
    # a float checkpoint has nothing to export: one line
    bad = run_tool('tools/export.py', cfg, ckpt, '--out', str(out / 'f.onnx'), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith('error: ') and 'is a float checkpoint' in bad.stderr
    assert bad.stderr.strip().count('\n') == 0 and result.returncode == 0


def test_int_export_of_a_folded_residual_quantized_checkpoint(float_run):
    """fold_bn and quant_residual go into the checkpoint's meta, so tools/export.py rebuilds the
    same model; the integer graph equals the integer simulator on every image."""
    tmp, cfg, ckpt = float_run
    out = tmp / 'int'
    run_tool('tools/test.py', cfg, ckpt, '--quant', 'minmax', '--quant-bits', 'w8a8', '--calib-images', '32',
             '--work-dir', str(out), '--out-metrics', str(out / 'm.json'),
             '--cfg-options', 'quant.options.fold_bn=True', 'quant.options.quant_residual=True')
    qckpt = read(out / 'm.json')['quantized_checkpoint']
    meta = torch.load(qckpt, weights_only=True)['meta']['mmquant']
    assert meta['fold_bn'] is True and meta['quant_residual'] is True
    proc = run_tool('tools/export.py', cfg, qckpt, '--format', 'int', '--out', str(out / 'int.onnx'),
                    '--check-images', '32', '--work-dir', str(out / 'exp'))
    assert 'onnxruntime vs the PyTorch integer simulator: 32 of 32 images bit-identical' in proc.stdout, proc.stdout[-2000:]
    census = re.search(r'requantisation: (\d+) integer multipliers, (\d+) of them powers of two', proc.stdout)
    assert census and int(census.group(1)) > 0
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('onnxruntime vs PyTorch on 32 test images')][0]
    top1 = re.findall(r'([0-9.]+) \((?:onnxruntime|PyTorch)', line)
    assert len(top1) == 2 and top1[0] == top1[1]


def test_bitsplit_through_the_cli_with_method_options(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'bitsplit'
    proc = run_tool('tools/test.py', cfg, ckpt, '--quant', 'bitsplit', '--quant-bits', 'w3', '--calib-images', '32',
                    '--work-dir', str(out), '--out-metrics', str(out / 'm.json'),
                    '--cfg-options', 'quant.options.iters=1', 'quant.options.num_samples=256')
    log = proc.stdout + proc.stderr
    # per-layer errors from the torch-only code reach the runner's log
    assert 'bitsplit: backbone.layer1.0.conv1 w3 float, output error: rtn' in log
    result = read(out / 'm.json')
    assert result['method'] == 'bitsplit' and result['bits'] == 'w3'
    state = torch.load(result['quantized_checkpoint'], weights_only=True)['state_dict']
    w = state['backbone.layer1.0.conv1.weight']
    scale = state['backbone.layer1.0.conv1.weight_quantizer.scale'].reshape(-1, 1, 1, 1)
    codes = w / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= 3   # 3-bit narrow grid


def test_brecq_fisher_mixed_precision_through_the_cli_and_reload(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'brecq'
    proc = run_tool('tools/test.py', cfg, ckpt, '--quant', 'brecq', '--quant-bits', 'w4a4', '--calib-images', '32',
                    '--work-dir', str(out), '--out-metrics', str(out / 'm.json'),
                    '--cfg-options', 'quant.options.iters=20', 'quant.options.batch_size=8',
                    'quant.options.loss=fisher', 'quant.options.drop_prob=0.5',
                    'quant.options.mixed_bits=[2,4,8]', 'quant.options.avg_bits=3.0')
    log = proc.stdout + proc.stderr
    # residual blocks are units; the task loss reached the Fisher weights (else: one-line error)
    assert 'mmquant brecq: backbone.layer1.0 (2 layers) output loss: rtn' in log
    assert 'mmquant brecq: mixed precision over' in log
    result = read(out / 'm.json')
    assert result['method'] == 'brecq' and result['bits'] == 'w4a4'
    saved = torch.load(result['quantized_checkpoint'], weights_only=True)
    chosen = saved['meta']['mmquant']['weight_bits']
    assert chosen['backbone.conv1'] == 8 and set(chosen.values()) <= {2, 4, 8}
    state = saved['state_dict']
    w = state['backbone.layer1.0.conv1.weight']
    scale = state['backbone.layer1.0.conv1.weight_quantizer.scale'].reshape(-1, 1, 1, 1)
    zero = state['backbone.layer1.0.conv1.weight_quantizer.zero_point'].reshape(-1, 1, 1, 1)
    codes = w / scale + zero                       # brecq's weight grids are affine (signed codes)
    b = chosen['backbone.layer1.0.conv1']
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= -2 ** (b - 1) and codes.round().max() <= 2 ** (b - 1) - 1
    # the quantized checkpoint evaluates again with its searched bits, without calibration
    again = tmp / 'brecq_reload'
    run_tool('tools/test.py', cfg, result['quantized_checkpoint'], '--work-dir', str(again),
             '--out-metrics', str(again / 'm.json'))
    assert read(again / 'm.json')['metrics'] == result['metrics']


def test_config_only_use_through_custom_imports(float_run, tmp_path):
    """No mmquant import in the process: the config's custom_imports registers everything."""
    _, cfg, ckpt = float_run
    user_cfg = write_config(tmp_path, f"""
_base_ = ['{cfg}', '{ROOT}/configs/_base_/quant/minmax_w8a8.py']
custom_imports = dict(imports=['mmquant'], allow_failed_imports=False)
test_cfg = dict(type='PTQLoop', calib_images=32)
load_from = '{ckpt}'
work_dir = '{tmp_path}/w'
""", 'user.py')
    code = ('from mmengine.config import Config; from mmengine.runner import Runner; '
            f'r = Runner.from_cfg(Config.fromfile({user_cfg!r})); m = r.test(); '
            'print("TOP1", m["accuracy/top1"], type(r.model).__name__, r.test_loop.method.qconfig.bits_tag())')
    proc = run_tool('-c', code)
    line = [x for x in proc.stdout.splitlines() if x.startswith('TOP1')][0]
    assert line.endswith('ImageClassifier w8a8')


def test_fake_quant_training_and_resume(float_run):
    tmp, cfg, ckpt = float_run
    work = tmp / 'qat'
    run_tool('tools/train.py', cfg, '--quant', 'minmax', '--quant-bits', 'w4a4', '--work-dir', str(work),
             '--cfg-options', f'load_from={ckpt}', 'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=2',
             'default_hooks.checkpoint.max_keep_ckpts=-1')
    state = torch.load(work / 'iter_4.pth', weights_only=True)['state_dict']
    assert bool(state['backbone.layer1.0.conv1.input_quantizer.calibrated'])
    assert int(state['backbone.layer1.0.conv1.weight_quantizer.bits_']) == 4
    # the saved weight scales match the saved weights (refreshed after the last optimizer step)
    w = state['backbone.layer1.0.conv1.weight']
    assert torch.isclose(state['backbone.layer1.0.conv1.weight_quantizer.scale'], w.abs().max() / 7).all()
    proc = run_tool('tools/train.py', cfg, '--quant', 'minmax', '--quant-bits', 'w4a4', '--work-dir', str(work),
                    '--resume', str(work / 'iter_2.pth'), '--cfg-options', 'train_cfg.max_iters=4',
                    'default_hooks.checkpoint.interval=2')
    log = proc.stdout + proc.stderr
    assert 'resumed epoch: 0, iter: 2' in log and 'calibrated' not in log   # no recalibration


@pytest.mark.parametrize('args, message', [
    (['--quant', 'nosuchmethod'], "error: unknown quantization method 'nosuchmethod'; accepted: aciq, bitsplit, brecq, f8net, kl, lapq, minmax, mse, percentile"),
    (['--quant', 'minmax', '--quant-bits', 'w0a8'], "error: weight bits in 'w0a8'=0 is out of range"),
    (['--quant-bits', 'w4a8'], 'error: --quant-bits needs --quant NAME'),
])
def test_cli_errors_are_one_line(args, message):
    proc = run_tool('tools/test.py', 'configs/resnet18_fashionmnist.py', 'missing.pth', *args, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith(message), proc.stderr


def test_qat_config_with_a_float_checkpoint_is_one_line(float_run):
    _, _, ckpt = float_run
    proc = run_tool('tools/test.py', 'configs/resnet18_fashionmnist_lsq_w4a4.py', ckpt, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0
    assert proc.stderr.startswith(f'error: {ckpt} is not a quantization-aware-trained checkpoint of lsq')


def test_missing_checkpoint_is_one_line():
    proc = run_tool('tools/test.py', 'configs/resnet18_fashionmnist.py', 'missing.pth', check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: checkpoint 'missing.pth' does not exist"


class NotAllowed:
    """A class no checkpoint should smuggle in."""


def test_openmmlab_checkpoint_loads_with_weights_only_and_nothing_else_does(float_run, tmp_path):
    _, _, ckpt = float_run
    full = torch.load(ckpt, map_location='cpu')            # torch's default: weights_only=True
    assert {'meta', 'state_dict', 'message_hub', 'optimizer'} <= set(full)
    bad = tmp_path / 'bad.pth'
    torch.save({'state_dict': {}, 'x': NotAllowed()}, bad)
    with pytest.raises(Exception, match='NotAllowed'):
        torch.load(bad, map_location='cpu')


def test_getattr_in_a_checkpoint_only_reaches_history_buffer_statistics(tmp_path):
    bad = tmp_path / 'getattr.pth'
    torch.save({'f': getattr(torch.Tensor, 'abs')}, bad)      # pickled as a global, refused
    with pytest.raises(Exception):
        torch.load(bad)
    from mmquant.engine.checkpoint import history_buffer_getattr
    with pytest.raises(Exception, match='only HistoryBuffer statistics'):
        history_buffer_getattr(torch, 'load')


def test_ptq_table_benchmark_runs_every_cell_and_writes_json(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'table.json'
    proc = run_tool('benchmarks/ptq_table.py', cfg, ckpt, '--methods', 'minmax,percentile', '--bits', 'w8a8,w4',
                    '--granularity', 'channel,layer', '--calib-images', '64', '--out', str(out))
    result = read(out)
    cells = {(r['bits'], r['column']) for r in result['results']}
    assert cells == {('fp', 'float')} | {(b, f'{m} ({g})') for b in ('w8a8', 'w4')
                                         for m in ('minmax', 'percentile') for g in ('channel', 'layer')}
    assert result['metric'] == 'accuracy/top1' and result['calib_images'] == 64
    assert all(0 <= r['value'] <= 100 for r in result['results'])
    assert '| W4 |' in proc.stdout and '| percentile (layer) |' in proc.stdout
    # image-by-image comparison with the baseline method, same granularity
    assert '| percentile (channel) - minmax (channel) | percentile (layer) - minmax (layer) |' in proc.stdout
    assert 'correct' not in result['results'][1]
    paired = [r['paired'] for r in result['results'] if r.get('method') == 'percentile']
    assert len(paired) == 4 and all(0 <= q['p'] <= 1 and q['b'] >= 0 and q['c'] >= 0 for q in paired)


def test_ptq_table_resume_keeps_the_cells_an_interrupted_run_finished(float_run, monkeypatch, capsys):
    tmp, cfg, ckpt = float_run
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import ptq_table
    out = tmp / 'resumed.json'
    argv = [cfg, ckpt, '--methods', 'minmax,percentile', '--bits', 'w8a8,w4', '--granularity', 'channel',
            '--calib-images', '32', '--out', str(out)]
    real, calls = ptq_table.evaluate, []

    def evaluate(*args, stop_after=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt                       # the machine went away after two cells
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(ptq_table, 'evaluate', lambda *a: evaluate(*a, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        ptq_table.main(argv)
    partial = read(str(out) + '.cells.json')
    assert [(r['bits'], r['column']) for r in partial['results']] == [('fp', 'float'), ('w8a8', 'minmax (channel)')]
    assert not out.exists()
    # other arguments: the saved cells are not mixed in
    with pytest.raises(SystemExit):
        ptq_table.main(argv[:5] + ['w4'] + argv[6:] + ['--resume'])
    assert 'holds cells of a run with other arguments' in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(ptq_table, 'evaluate', evaluate)
    results = ptq_table.main(argv + ['--resume'])
    assert len(calls) == 3                                # only the three cells not finished before
    assert [(r['bits'], r['column']) for r in results] == [
        ('fp', 'float'), ('w8a8', 'minmax (channel)'), ('w8a8', 'percentile (channel)'), ('w4', 'minmax (channel)'),
        ('w4', 'percentile (channel)')]
    assert results[1]['value'] == partial['results'][1]['value']
    # the kept cell's per-image results came back: the image-by-image comparison uses them
    assert all('paired' in r for r in results if r.get('method') == 'percentile')
    assert read(out)['results'][1]['value'] == partial['results'][1]['value']
    assert not osp.exists(str(out) + '.cells.json')


def test_qat_table_jobs_train_runs_at_once_keep_the_order_and_resume(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import threading
    import time
    import qat_table
    ckpt = tmp_path / 'float.pth'
    ckpt.write_bytes(b'')
    running, peak, seen = [0], [0], []
    lock = threading.Lock()

    def fake_run(cmd, log_path, env=None):              # stands in for one tools/train.py / tools/test.py process
        if 'tools/test.py' in cmd[1]:
            out = cmd[cmd.index('--out-metrics') + 1]
            with open(out, 'w') as f:
                json.dump(dict(metrics={'accuracy/top1': 91.0}), f)
            return 0, 1.0
        work_dir = cmd[cmd.index('--work-dir') + 1]
        method = osp.basename(work_dir).split('_')[0]
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((method, env and env.get('OMP_NUM_THREADS')))
        time.sleep(0.3 if method == 'dorefa' else 0.05)  # the first run finishes last
        os.makedirs(osp.join(work_dir, 'run', 'vis_data'))
        with open(osp.join(work_dir, 'run', 'vis_data', 'scalars.json'), 'w') as f:
            f.write(json.dumps({'accuracy/top1': 80.0 + len(method)}) + '\n')
        with lock:
            running[0] -= 1
        return 0, 2.0
    monkeypatch.setattr(qat_table, 'run', fake_run)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 4)
    out = tmp_path / 'qat.json'
    argv = [str(ckpt), '--work-root', str(tmp_path / 'runs'), '--out', str(out)]
    rows = qat_table.main(argv + ['--runs', 'dorefa:w4a4,pact:w4a4,lsq:w4a4', '--jobs', '2'])
    assert peak[0] == 2 and {t for _, t in seen} == {'2'}   # two at once, the 4 cores split between them
    assert [(r['method'], r['top1']) for r in rows] == [('dorefa', 86.0), ('pact', 84.0), ('lsq', 83.0)]
    assert [r['method'] for r in read(out)['rows']] == ['dorefa', 'pact', 'lsq']
    seen.clear()
    rows = qat_table.main(argv + ['--runs', 'dorefa:w4a4,pact:w4a4,lsq:w4a4,lsq:w2a2', '--resume'])
    assert seen == [('lsq', None)]                       # only the new run; one job: the environment as it is
    assert [(r['method'], r['bits']) for r in rows][-1] == ('lsq', 'w2a2') and len(rows) == 4
    with pytest.raises(SystemExit):
        qat_table.main(argv + ['--jobs', '0'])
    assert capsys.readouterr().err.strip() == 'error: --jobs=0 must be >= 1'


@pytest.mark.parametrize('args, message', [
    (['--methods', 'nosuch'], "error: unknown quantization method 'nosuch'"),
    (['--granularity', 'tensor'], "error: unknown granularity ['tensor']; accepted: channel, layer"),
    (['--options', 'num_samples=4'], "error: --options 'num_samples=4': expected METHOD.OPTION=VALUE"),
    (['--options', 'bitsplit.nosuch=4'], "error: unknown options ['nosuch'] for method 'bitsplit'"),
    (['--bits', 'w1'], "error: weight bits in 'w1'=1 is out of range"),
    (['--baseline', 'nosuch'], "error: unknown quantization method 'nosuch'"),
    (['--qconfig', '{bad'], "error: --qconfig is not valid JSON"),
])
def test_ptq_table_errors_are_one_line(args, message):
    proc = run_tool('benchmarks/ptq_table.py', 'configs/resnet18_fashionmnist.py', 'missing.pth', *args, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith(message), proc.stderr


def test_onnx_latency_benchmark_times_fp32_and_exported_models(float_run, tmp_path):
    tmp, cfg, ckpt = float_run
    proc = run_tool('benchmarks/onnx_latency.py', cfg, ckpt, '--batch', '1,2', '--runs', '2', '--warmup', '1',
                    '--profile')
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith('| fp32 |')]
    assert len(rows) == 2 and rows[0].count('1.00x') == rows[1].count('1.00x') == 2   # median, fastest run
    assert 'fastest of the 2 runs' in proc.stdout
    for table in proc.stdout.split('kernel time per run')[1:]:     # one per batch size
        rows = {ln.split(' | ')[0][2:]: float(ln.split(' | ')[1].strip(' |')) for ln in table.splitlines()
                if ln.startswith('| ') and not ln.startswith('| group')}
        assert 'layer1' in rows and 'layer4' in rows
        assert rows['all kernels'] == pytest.approx(sum(v for k, v in rows.items() if k != 'all kernels'), abs=0.03)
    assert proc.stdout.count('| all kernels | ') == 2
    bad = run_tool('benchmarks/onnx_latency.py', cfg, ckpt, '--batch', 'one', check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --batch 'one': expected comma-separated integers, e.g. 1,32"


def test_onnx_latency_kernel_groups_count_the_timed_runs_by_stage():
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import onnx_latency

    def node(name, op, ts, dur):
        return dict(cat='Node', name=f'{name}_kernel_time', ts=ts, dur=dur, args=dict(op_name=op))
    events = [dict(cat='Session', name='model_run', ts=0, dur=100),     # the warm-up run: left out
              node('/model/backbone/layer1/layer1.0/conv1/Conv', 'Conv', 10, 999),
              dict(cat='Session', name='model_run', ts=200, dur=100),
              node('/model/backbone/layer1/layer1.0/conv1/Conv', 'QLinearConv', 210, 3000),
              node('/model/backbone/layer2/layer2.0/Add', 'QLinearAdd', 220, 1000),
              node('/model/backbone/conv1/Conv', 'QLinearConv', 230, 500),
              node('/model/neck/gap/GlobalAveragePool', 'GlobalAveragePool', 240, 200),
              dict(cat='Node', name='/model/backbone/conv1/Conv_fence_before', ts=250, dur=5, args={}),
              dict(cat='Session', name='model_run', ts=400, dur=100),
              node('/model/backbone/layer1/layer1.0/conv1/Conv', 'QLinearConv', 410, 1000)]
    assert onnx_latency.kernel_groups(events, runs=2) == dict(
        layer1=2.0, layer2=0.5, **{'other convs': 0.25, 'other ops': 0.1})


def test_analyze_names_layers_suggests_bits_within_budget_and_its_config_runs(float_run):
    tmp, cfg, ckpt = float_run
    out = tmp / 'analyze'
    proc = run_tool('tools/analyze.py', cfg, ckpt, '--quant-bits', 'w4a8', '--calib-images', '32',
                    '--eval-images', '64', '--candidates', '2,8', '--verify', '--out-dir', str(out))
    result = read(out / 'sensitivity.json')
    layers = result['layers']
    assert len(layers) == 21 and layers[0]['name'] == 'backbone.conv1' and result['eval_images'] == 64
    assert all(set(r['noise']) == {'2', '8'} and r['noise']['2'] > r['noise']['8'] for r in layers)
    assert all(0 <= r['only_metric'] <= 100 and -1 <= r['only_cosine'] <= 1 for r in layers)
    # first and last layers keep their 8 bits; the rest average at most 4 bits per weight
    assert set(result['fixed_layers']) == {'backbone.conv1', 'head.fc'}
    chosen = result['suggested']
    sizes = {r['name']: r['params'] for r in layers}
    assert set(chosen) == set(sizes) - {'backbone.conv1', 'head.fc'} and set(chosen.values()) <= {2, 8}
    assert sum(sizes[n] * b for n, b in chosen.items()) <= 4 * sum(sizes[n] for n in chosen)
    uniform, suggested = result['verify']
    assert suggested['weight_bytes'] <= uniform['weight_bytes']
    assert 'most sensitive (lowest SQNR with only that layer quantized): ' in proc.stdout
    assert (out / 'sensitivity.png').read_bytes()[:4] == b'\x89PNG'
    # the written config quantizes with the suggested bits through tools/test.py
    mixed = out / 'mixed_w4a8.py'
    run_tool('tools/test.py', str(mixed), ckpt, '--calib-images', '32', '--work-dir', str(tmp / 'mixed'),
             '--out-metrics', str(tmp / 'mixed' / 'm.json'))
    m = read(tmp / 'mixed' / 'm.json')
    assert m['method'] == 'minmax' and m['metrics']['accuracy/top1'] == pytest.approx(suggested['metrics']['accuracy/top1'])
    assert not list(out.glob('*.tmp*'))


@pytest.mark.parametrize('args, message', [
    (['--quant', 'nosuch'], "error: unknown quantization method 'nosuch'"),
    (['--quant-bits', 'w0'], "error: weight bits in 'w0'=0 is out of range"),
    (['--candidates', '2,1'], 'error: --candidates'),
    (['--avg-bits', '1.5'], 'error: --avg-bits 1.5 is below the smallest candidate 2'),
])
def test_analyze_errors_are_one_line(args, message):
    proc = run_tool('tools/analyze.py', 'configs/resnet18_fashionmnist.py', 'missing.pth', *args, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith(message), proc.stderr


def test_benchmark_plans_every_step_and_renders_tables_and_plots(tmp_path):
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    # every checkpoint missing, so the plan does not depend on what this checkout's work_dirs holds
    proc = run_tool('tools/benchmark.py', '--dry-run', '--mode', 'quick', '--out-dir', str(tmp_path),
                    '--checkpoints', 'resnet18=missing_r18/epoch_8.pth', 'vgg11bn=missing_vgg/epoch_4.pth',
                    'retinanet=missing_det/epoch_2.pth')
    lines = dict(ln.split(': ', 1) for ln in proc.stdout.splitlines())
    names = list(lines)
    assert names[:3] == ['train_resnet18', 'train_vgg11bn', 'train_retinanet']  # missing float checkpoints first
    assert {'ptq_resnet18', 'ptq_resnet18_qdrop', 'ptq_vgg11bn', 'qat', 'latency', 'ptq_retinanet'} <= set(names)
    assert 'missing_r18/iter_100.pth' in lines['ptq_resnet18']   # the step uses the checkpoint it just trained
    assert 'missing_vgg/iter_100.pth' in lines['ptq_vgg11bn']
    # the report from ptq_table / qat_table results
    results = [dict(bits='fp', column='float', value=92.0, weight_bytes=44e6),
               dict(bits='w4a4', column='minmax (channel)', value=91.0, calib_seconds=2.0, weight_bytes=5.6e6),
               dict(bits='w4a4', column='brecq (channel)', value=91.8, calib_seconds=300.0, weight_bytes=5.6e6),
               dict(bits='w2a4', column='minmax (channel)', value=50.0, calib_seconds=2.0, weight_bytes=2.9e6),
               dict(bits='w2a4', column='brecq (channel)', value=89.0, calib_seconds=310.0, weight_bytes=2.9e6)]
    with open(tmp_path / 'ptq_resnet18.json', 'w') as f:
        json.dump(dict(metric='accuracy/top1', calib_images=1024, results=results), f)
    with open(tmp_path / 'qat.json', 'w') as f:
        json.dump(dict(rows=[dict(method='lsq', bits='w4a4', top1=91.5, seconds=300, fp_top1=92.0)]), f)
    env = dict(date='d', commit='c', machine='m', python='3.11', torch='t', mmengine='e', mmcv='v',
               mmpretrain='p', mmdet='d', onnxruntime='o')
    steps = {'ptq_resnet18': dict(rc=0, seconds=12.0, resumed=False, commit='c', date='d'),
             'qat': dict(rc=0, seconds=30.0, resumed=True, commit='b', date='yesterday')}
    text = benchmark.report(str(tmp_path), env, 'quick', steps)
    # a step finished in an earlier sitting names its commit and says its time is the last sitting's
    assert 'Steps and wall time: ptq_resnet18 12 s, qat 30 s (resumed: the time of the sitting that ' \
           'finished it; commit b, yesterday)' in text
    assert '| W4A4 | 91.00 (2 s, 5.60 MB) | 91.80 (300 s, 5.60 MB) |' in text
    assert '| FP | 92.00 (44.00 MB) | 92.00 (44.00 MB) |' in text
    assert '| lsq | W4A4 | 91.50 | -0.50 | 300 |' in text and 'commit c' in text
    for png in ('resnet18_bits.png', 'resnet18_pareto.png'):
        assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG' and f'({png})' in text
    # the plots' y axis starts 5 under float when a collapsed cell (50.0 here) would squash the others
    assert benchmark.plot_floor([91.0, 91.8, 50.0, 89.0], 92.0) == 87.0
    assert benchmark.plot_floor([91.0, 89.0], 92.0) == -float('inf') == benchmark.plot_floor([50.0], None)


def test_benchmark_records_every_step_across_sittings(tmp_path, monkeypatch):
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    ckpt = tmp_path / 'r18.pth'
    ckpt.write_bytes(b'')
    ran = []
    ptq = dict(metric='accuracy/top1', calib_images=128, results=[
        dict(bits='fp', column='float', value=92.0, weight_bytes=44e6),
        dict(bits='w4a4', column='brecq (channel)', value=91.0, calib_seconds=3.0, weight_bytes=5.6e6)])

    def fake_run(name, argv, out_dir):                  # each step's script, writing its result file
        ran.append((name, '--resume' in argv))
        if name == 'qat' and '--resume' in argv:        # a sitting beside this one finishes a step meanwhile
            steps = read(tmp_path / 'steps.json')
            steps['latency'] = dict(rc=0, seconds=7.0, resumed=False, commit='c3', date='d3')
            (tmp_path / 'steps.json').write_text(json.dumps(steps))
        out = argv[argv.index('--out') + 1]
        with open(out, 'w') as f:
            json.dump(ptq if name.startswith('ptq') else dict(rows=[dict(
                method='lsq', bits='w4a4', top1=91.5, seconds=300, fp_top1=92.0)]), f)
        return 0, 5.0, ''
    monkeypatch.setattr(benchmark, 'run', fake_run)
    monkeypatch.setattr(benchmark, 'environment', lambda: dict(
        date='d1', commit='c1', machine='m', python='3.11', torch='t', mmengine='e', mmcv='v', mmpretrain='p',
        mmdet='d', onnxruntime='o'))
    argv = ['--steps', 'ptq_resnet18,qat', '--out-dir', str(tmp_path), '--checkpoints', f'resnet18={ckpt}']
    benchmark.main(argv)
    assert ran == [('ptq_resnet18', False), ('ptq_resnet18_qdrop', False), ('qat', False)]
    monkeypatch.setattr(benchmark, 'environment', lambda: dict(
        date='d2', commit='c2', machine='m', python='3.11', torch='t', mmengine='e', mmcv='v', mmpretrain='p',
        mmdet='d', onnxruntime='o'))
    ran.clear()
    benchmark.main(argv + ['--resume'])
    assert ran == [('qat', True)]                       # the PTQ steps kept; QAT asked to resume its runs
    steps = read(tmp_path / 'steps.json')
    assert list(steps) == ['ptq_resnet18', 'ptq_resnet18_qdrop', 'qat', 'latency']   # the other sitting's kept
    date = steps['qat'].pop('date')                     # when the step started, not when the sitting did
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d', date)
    assert steps['ptq_resnet18']['commit'] == 'c1' and steps['qat'] == dict(
        rc=0, seconds=5.0, resumed=True, commit='c2')
    text = (tmp_path / 'results.md').read_text()
    assert f'ptq_resnet18 5 s (commit c1, {steps["ptq_resnet18"]["date"]})' in text
    assert 'commit c2' in text.splitlines()[2] and 'latency 7 s (commit c3, d3)' in text


def test_benchmark_keeps_the_latency_table_and_its_kernel_profile(tmp_path, monkeypatch):
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark
    ckpt = tmp_path / 'r18.pth'
    ckpt.write_bytes(b'')
    printed = ['some warning', 'onnxruntime 1.32.0, 2 threads, median of 50 runs after 5',
               '| model | batch 1 (ms) | vs fp32 @1 |', '|---|---|---|', '| fp32 | 5.00 | 1.00x |',
               '| q.onnx | 1.00 | 5.00x |', '', 'fastest of the 50 runs', '| model | batch 1 (ms) | vs fp32 @1 |',
               '|---|---|---|', '| fp32 | 4.00 | 1.00x |', '', 'kernel time per run (ms, onnxruntime profiler, batch 1; ratio: fp32 / model)',
               '| group | fp32 | q.onnx |', '|---|---|---|', '| layer1 | 4.00 | 1.00 (4.00x) |']
    monkeypatch.setattr(benchmark, 'run', lambda name, argv, out_dir: (0, 1.0, '\n'.join(printed)))
    benchmark.main(['--steps', 'latency', '--out-dir', str(tmp_path), '--checkpoints', f'resnet18={ckpt}'])
    kept = (tmp_path / 'latency.md').read_text().splitlines()
    assert kept == printed[1:] and 'kernel time per run' in (tmp_path / 'results.md').read_text()


@pytest.mark.parametrize('args, message', [
    (['--steps', 'ptq,nosuch'], "error: unknown step 'ptq'; accepted: ptq_resnet18"),
    (['--checkpoints', 'resnet50=x.pth'], "error: --checkpoints 'resnet50=x.pth': expected MODEL=PATH"),
    (['--jobs', '0'], 'error: --jobs=0 must be >= 1'),
])
def test_benchmark_errors_are_one_line(args, message):
    proc = run_tool('tools/benchmark.py', '--dry-run', *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and proc.stderr.startswith(message), proc.stderr
