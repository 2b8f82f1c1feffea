"""Quantization-aware training end to end on real Fashion-MNIST images: tools/train.py with the
QAT scheme configs, checkpoints and their meta, exact resume, tools/test.py on QAT checkpoints,
the binary block rewrites loading a float checkpoint, the quantizer parameters' weight decay,
QATFreezeHook, a 2-process DDP run and the CLI's one-line errors.

For speed the tools run in this process (``tools/train.py``'s and ``tools/test.py``'s ``main``
with an argv, the code path of the command line; importing mmengine / mmpretrain costs ~7 s per
process), on the first 512 training and 64 test images of Fashion-MNIST written as small idx
files (the FashionMNIST dataset parses its whole 60000-image file on every build otherwise).
Only the DDP run is a real (torchrun) process. The training pipeline has no random
augmentation, so a resumed run must replay the uninterrupted one bit for bit.
"""
import glob
import importlib.util
import itertools
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import mmquant  # noqa: F401  (registers the entry points, allow-lists checkpoint classes)
from mmquant.engine.cli import apply_qat
from mmquant.engine.ptq_loop import unwrap
from mmquant.engine.qat_freeze_hook import QATFreezeHook
from mmquant.nn.binary_blocks import BinaryBasicBlock, GroupNetBlock
from mmquant.quantizers import LQNetQuantizer, LSQQuantizer, PACTQuantizer, SignActQuantizer

from conftest import ROOT, write_config, write_small_fashion_mnist

# mmpretrain 1.2.0's MNIST loader under numpy 2, once per image
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'mmquant_tools_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN, TEST = _load_tool('train'), _load_tool('test')
_RUN_IDS = itertools.count()


@HOOKS.register_module(force=True)
class QATProbeHook(Hook):
    """Test probe: the model's state once every ``before_train`` hook has run (after the loaded /
    resumed checkpoint and the calibration hook) and at the end of training."""
    priority = 'LOWEST'

    @staticmethod
    def snapshot(runner):
        return {k: v.detach().clone() for k, v in unwrap(runner.model).state_dict().items()}

    def before_train(self, runner):
        self.start = self.snapshot(runner)

    def after_train(self, runner):
        self.end = self.snapshot(runner)


def probe(runner) -> QATProbeHook:
    return next(h for h in runner.hooks if isinstance(h, QATProbeHook))


def log_text(work_dir) -> str:
    """The runner's log file(s) under ``work_dir``."""
    return ''.join(open(f).read() for f in sorted(glob.glob(osp.join(str(work_dir), '*', '*.log'))))


def quant_keys(state):
    return sorted(k for k in state if 'quantizer' in k)


def assert_same(a, b, keys):
    """Bit-for-bit equality of ``keys`` in two state dicts."""
    differ = [k for k in keys if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f'{len(differ)} entries differ, e.g. {differ[:5]}'


def train(cfg, work, *args, options=()):
    """tools/train.py in this process; returns its Runner (unique experiment names keep the
    loggers and visualizers of successive runners apart)."""
    return TRAIN.main([cfg, '--work-dir', str(work), *args, '--cfg-options',
                       f'experiment_name=qat{next(_RUN_IDS)}', *options])


def evaluate(cfg, ckpt, work, *args):
    return TEST.main([cfg, str(ckpt), '--work-dir', str(work), *args, '--cfg-options',
                      f'experiment_name=qat{next(_RUN_IDS)}'])


# ----------------------------------------------------------------------------------------------
# fixtures: the small data set, a float checkpoint, the QAT runs shared by several tests


@pytest.fixture(scope='module')
def small_data(tmp_path_factory, fashion_mnist):
    return write_small_fashion_mnist(tmp_path_factory.mktemp('fashion_mnist_small'), fashion_mnist, 512, 64)


SMALL = """
_base_ = ['{base}']
data_root = '{data}'
train_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=[dict(type='PackInputs')]))
val_dataloader = dict(batch_size=64, num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
param_scheduler = []
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={interval}, max_keep_ckpts=-1),
                     logger=dict(interval=1))
custom_hooks = [dict(type='QATProbeHook')]
"""


@pytest.fixture(scope='module')
def qat_env(tmp_path_factory, small_data):
    """A float checkpoint from 2 float iterations, and a maker of small QAT configs from the
    repository's scheme configs (``resnet18_fashionmnist_{scheme}.py``) loading it."""
    tmp = tmp_path_factory.mktemp('qat_engine')
    float_cfg = write_config(tmp, SMALL.format(base=f'{ROOT}/configs/resnet18_fashionmnist.py', data=small_data,
                                               iters=2, interval=2), 'float.py')
    train(float_cfg, tmp / 'float')
    float_ckpt = str(tmp / 'float' / 'iter_2.pth')

    def qat_config(scheme, iters=2, interval=1, extra=''):
        text = SMALL.format(base=f'{ROOT}/configs/resnet18_fashionmnist_{scheme}.py', data=small_data,
                            iters=iters, interval=interval)
        text += f"load_from = '{float_ckpt}'\nquant = dict(calib_batches=1)\n" + extra
        return write_config(tmp, text, f'{scheme}_{iters}_{next(_RUN_IDS)}.py')

    return dict(tmp=tmp, float_cfg=float_cfg, float_ckpt=float_ckpt, qat_config=qat_config)


NO_VAL = 'val_dataloader = val_cfg = val_evaluator = None\n'


@pytest.fixture(scope='module')
def qat_run(qat_env):
    """``qat_run(scheme, iters, interval, val)``: one uninterrupted QAT training by tools/train.py
    (checkpoints every ``interval`` iterations, validation at the end), made once per module."""
    runs = {}

    def run(scheme, iters=2, interval=1, val=True):
        key = (scheme, iters, interval, val)
        if key not in runs:
            cfg = qat_env['qat_config'](scheme, iters, interval, extra='' if val else NO_VAL)
            work = qat_env['tmp'] / f'{scheme}_{iters}'
            runner = train(cfg, work)
            top1 = runner.message_hub.get_scalar('val/accuracy/top1').current() if val else None
            runs[key] = dict(cfg=cfg, work=work, probe=probe(runner), log=log_text(work), top1=top1)
        return runs[key]
    return run


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------------------------
# 1. tools/train.py with a QAT scheme config


def test_train_lsq_scheme_config_writes_a_qat_checkpoint(qat_env, qat_run):
    run = qat_run('lsq_w4a4')
    assert 'mmquant: calibrated 21 layers on 1 training batches before training' in run['log']
    assert 'Epoch(val)' in run['log'] and 0 <= run['top1'] <= 100
    ckpt = load(run['work'] / 'iter_2.pth')
    meta = ckpt['meta']['mmquant_qat']
    assert meta['method'] == 'lsq' and meta['bits'] == 'w4a4'
    assert meta['first_layers'] == ['backbone.conv1'] and meta['last_layers'] == ['head.fc']
    state = ckpt['state_dict']
    for layer, bits in (('backbone.conv1', 8), ('backbone.layer1.0.conv1', 4), ('head.fc', 8)):
        for q in ('weight_quantizer', 'input_quantizer'):
            assert int(state[f'{layer}.{q}.bits_']) == bits and bool(state[f'{layer}.{q}.calibrated'])
            assert state[f'{layer}.{q}.step'].gt(0).all() and int(state[f'{layer}.{q}.elements']) > 0
    assert state['backbone.layer1.0.conv1.weight_quantizer.step'].numel() == 1   # per tensor (LSQ paper)
    # the float checkpoint was loaded, then the steps and BN statistics trained
    start, float_state = run['probe'].start, load(qat_env['float_ckpt'])['state_dict']
    assert_same(start, float_state, list(float_state))
    steps = [k for k in state if k.endswith('quantizer.step')]
    changed = [k for k in steps if not torch.equal(start[k], state[k])]
    assert len(steps) == 42 and len(changed) > 30       # (a few get updates below float32's resolution)
    assert not torch.equal(start['backbone.bn1.running_mean'], state['backbone.bn1.running_mean'])


# ----------------------------------------------------------------------------------------------
# 2. resume: the quantizers come back exactly, nothing is recalibrated, the run replays


@pytest.mark.parametrize('scheme, val, learned', [
    ('lsq_w4a4', True, 'input_quantizer.step'),
    ('lqnet_w2a2', False, 'input_quantizer.basis'),      # a buffer refit by every training forward
])
def test_resume_restores_quantizers_exactly_without_recalibration(qat_run, scheme, val, learned):
    iters, k = 2, 1
    run = qat_run(scheme, iters, k, val)
    saved = load(run['work'] / f'iter_{k}.pth')['state_dict']
    layer = 'backbone.layer2.0.conv1'
    assert not torch.equal(saved[f'{layer}.{learned}'], run['probe'].start[f'{layer}.{learned}'])  # it trains
    work = run['work'].parent / f'{run["work"].name}_resumed'
    runner = train(run['cfg'], work, '--resume', str(run['work'] / f'iter_{k}.pth'))
    log = log_text(work)
    assert f'resumed epoch: 0, iter: {k}' in log and 'mmquant: calibrated' not in log
    resumed = probe(runner).start
    assert quant_keys(resumed) == quant_keys(saved) and len(quant_keys(saved)) > 0
    assert_same(resumed, saved, quant_keys(saved))
    assert_same(resumed, saved, list(saved))           # weights and BN statistics as well
    # continuing from iteration k reproduces the uninterrupted run bit for bit
    final, uninterrupted = load(work / f'iter_{iters}.pth'), load(run['work'] / f'iter_{iters}.pth')
    assert_same(final['state_dict'], uninterrupted['state_dict'], list(uninterrupted['state_dict']))
    assert final['meta']['mmquant_qat'] == uninterrupted['meta']['mmquant_qat']
    if val:
        assert runner.message_hub.get_scalar('val/accuracy/top1').current() == run['top1']


def test_train_f8net_scheme_config_folds_bn_and_test_tool_rebuilds_it(qat_env, qat_run, tmp_path):
    """F8Net through the tools: the float checkpoint loads into the BN-fused model (the BatchNorms
    keep their keys), training moves BN statistics and clip levels, the checkpoint's fixed-point
    grids are integers FLs, and tools/test.py rebuilds the model and reproduces the validation;
    the PTQ tiny fine-tune runs from the float checkpoint through ``--quant f8net``."""
    run = qat_run('f8net_w8a8')
    assert 'f8net w8a8: 21 layers quantized, 0 kept float; 20 convs fold their BatchNorm' in run['log']
    ckpt = load(run['work'] / 'iter_2.pth')
    assert ckpt['meta']['mmquant_qat']['method'] == 'f8net'
    state, start, float_state = ckpt['state_dict'], run['probe'].start, load(qat_env['float_ckpt'])['state_dict']
    assert_same(start, float_state, list(float_state))                 # every float key loaded
    assert not torch.equal(start['backbone.layer1.0.bn1.running_mean'], state['backbone.layer1.0.bn1.running_mean'])
    alpha = 'backbone.layer1.0.conv1.input_quantizer.alpha'
    assert not torch.equal(start[alpha], state[alpha])
    assert 'backbone.layer1.1.conv1.input_quantizer.alpha' not in state    # shares layer1.0.conv1's
    for key in ('backbone.layer1.0.conv1.weight_quantizer.frac_len', 'head.fc.input_quantizer.frac_len'):
        assert state[key].dtype == torch.long
    result = evaluate(run['cfg'], run['work'] / 'iter_2.pth', tmp_path / 'test')
    assert result['metrics']['accuracy/top1'] == run['top1']
    ptq = evaluate(qat_env['float_cfg'], qat_env['float_ckpt'], tmp_path / 'ptq', '--quant', 'f8net',
                   '--calib-images', '32')
    assert ptq['method'] == 'f8net' and ptq['bits'] == 'w8a8' and 0 <= ptq['metrics']['accuracy/top1'] <= 100
    assert '20 convs fold their BatchNorm' in log_text(tmp_path / 'ptq')


# ----------------------------------------------------------------------------------------------
# 3. tools/test.py on a QAT checkpoint


def test_test_tool_evaluates_a_qat_checkpoint_as_trained(qat_env, qat_run, tmp_path, capsys):
    run = qat_run('lsq_w4a4')
    ckpt = run['work'] / 'iter_2.pth'
    for name, cfg in (('qat_cfg', run['cfg']), ('float_cfg', qat_env['float_cfg'])):
        result = evaluate(cfg, ckpt, tmp_path / name)
        assert result['metrics']['accuracy/top1'] == run['top1'], name       # the training's validation
        assert 'method' not in result                                     # no PTQ loop
        assert 'calibrated' not in log_text(tmp_path / name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate(run['cfg'], ckpt, tmp_path / 'minmax', '--quant', 'minmax')
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count('\n') == 1
    assert err.startswith(f"error: {ckpt} was trained with lsq at w4a4; drop --quant to evaluate it")


# ----------------------------------------------------------------------------------------------
# 4. binary methods: block rewrites fed by the float checkpoint


def test_bireal_trains_from_the_float_checkpoint(qat_env, qat_run):
    run = qat_run('bireal_w1a1', 1, 1, val=False)
    float_state = load(qat_env['float_ckpt'])['state_dict']
    assert_same(run['probe'].start, float_state, list(float_state))     # same keys after the rewrite
    ckpt = load(run['work'] / 'iter_1.pth')
    assert ckpt['meta']['mmquant_qat']['method'] == 'bireal'
    state = ckpt['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert 'backbone.layer1.0.conv1.weight_quantizer.bits_' in state
    assert not torch.equal(state['backbone.layer1.0.conv1.weight'], float_state['backbone.layer1.0.conv1.weight'])


def test_groupnet_two_branches_each_get_the_float_block(qat_env):
    cfg = qat_env['qat_config']('groupnet_w1a1', iters=1, interval=1, extra=NO_VAL)
    work = qat_env['tmp'] / 'groupnet'
    runner = train(cfg, work, options=['quant.branches=2'])
    model = unwrap(runner.model)
    block = model.backbone.layer1[0]
    assert isinstance(block, GroupNetBlock) and len(block.branches) == 2
    assert isinstance(block.branches[1], BinaryBasicBlock)
    assert isinstance(block.branches[0].conv1.input_quantizer, SignActQuantizer)
    start, float_state = probe(runner).start, load(qat_env['float_ckpt'])['state_dict']
    blocks = {n for n, m in model.named_modules() if isinstance(m, GroupNetBlock)}
    assert len(blocks) == 8
    for key, value in float_state.items():
        owner = next((b for b in blocks if key.startswith(b + '.')), None)
        if owner is None:
            assert torch.equal(start[key], value), key
            continue
        rest = key[len(owner) + 1:]
        assert torch.equal(start[f'{owner}.branches.0.{rest}'], value), key
        branch1 = start[f'{owner}.branches.1.{rest}']
        if rest.endswith('weight') and value.dim() == 4:        # branch 1's convs: perturbed copies
            assert not torch.equal(branch1, value)
            assert (branch1 - value).std() < 0.1 * value.float().std(), key
        else:
            assert torch.equal(branch1, value), key
    assert torch.equal(start['backbone.layer1.0.lambdas'], torch.tensor([0.5, 0.5]))
    ckpt = load(work / 'iter_1.pth')
    assert ckpt['meta']['mmquant_qat']['branches'] == 2 and ckpt['meta']['mmquant_qat']['method'] == 'groupnet'


# ----------------------------------------------------------------------------------------------
# 5. the optimizer's parameter groups


@pytest.mark.parametrize('scheme, key, decay', [
    ('lsq_w4a4', 'quantizer.step', 0.0),           # LSQ: no decay on the steps
    ('pact_w4a4', 'input_quantizer.alpha', 5e-4),  # PACT: L2 on the clip level, the base decay
    ('f8net_w8a8', 'input_quantizer.alpha', 5e-4),  # F8Net's PACT clip levels (one per residual stream)
    ('groupnet_w1a1', '.lambdas', 0.0),
])
def test_quantizer_parameters_get_their_weight_decay(qat_env, scheme, key, decay):
    cfg = Config.fromfile(qat_env['qat_config'](scheme))
    apply_qat(cfg)
    cfg.work_dir = str(qat_env['tmp'] / f'groups_{scheme}')
    cfg.experiment_name = f'qat{next(_RUN_IDS)}'
    runner = Runner.from_cfg(cfg)
    optim = runner.build_optim_wrapper(cfg.optim_wrapper).optimizer
    base = cfg.optim_wrapper.optimizer.weight_decay
    assert base == 5e-4
    names = {id(p): n for n, p in runner.model.named_parameters()}
    decays = {names[id(p)]: g['weight_decay'] for g in optim.param_groups for p in g['params']}
    assert len(decays) == len(names)
    matched = {n: d for n, d in decays.items() if key in n}
    assert len(matched) >= 8 and set(matched.values()) == {decay}, matched
    # every other parameter (convs, BN, the fc, the other quantizers' if any) keeps the base decay
    others = {n: d for n, d in decays.items() if n not in matched}
    assert 'backbone.conv1.weight' in others and set(others.values()) == {base}, others


# ----------------------------------------------------------------------------------------------
# 6. QATFreezeHook


@pytest.mark.parametrize('kwargs', [dict(freeze_bn_epoch=-1), dict(freeze_quant_epoch='1'),
                                    dict(freeze_bn_epoch=1.5)])
def test_freeze_hook_rejects_invalid_epochs(kwargs):
    with pytest.raises(ValueError, match='must be a non-negative integer epoch or None'):
        QATFreezeHook(**kwargs)


@pytest.mark.parametrize('scheme, quantizer, learned', [
    ('lsq_w4a4', LSQQuantizer, 'step'),
    ('pact_w4a4', PACTQuantizer, 'alpha'),
    ('lqnet_w2a2', LQNetQuantizer, 'basis'),
])
def test_freeze_hook_keeps_bn_statistics_and_quantizers_fixed(qat_env, scheme, quantizer, learned):
    extra = ("custom_hooks = [dict(type='QATProbeHook'), "
             "dict(type='QATFreezeHook', freeze_bn_epoch=0, freeze_quant_epoch=0)]\n" + NO_VAL
             + 'default_hooks = dict(checkpoint=None)\n')
    cfg = qat_env['qat_config'](scheme, iters=1, interval=1, extra=extra)
    runner = train(cfg, qat_env['tmp'] / f'freeze_{scheme}')
    start, end = probe(runner).start, probe(runner).end
    bn = [k for k in start if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(bn) == 60
    assert_same(start, end, bn)
    frozen = [k for k in quant_keys(start) if k.endswith('.' + learned)]
    assert len(frozen) >= 21
    assert_same(start, end, quant_keys(start))
    model = unwrap(runner.model)
    assert any(isinstance(q, quantizer) and q.frozen for q in model.modules())
    # the rest of the network trained
    assert not torch.equal(start['backbone.layer1.0.conv1.weight'], end['backbone.layer1.0.conv1.weight'])
    assert not torch.equal(start['backbone.layer1.0.bn1.weight'], end['backbone.layer1.0.bn1.weight'])


# ----------------------------------------------------------------------------------------------
# 7. DDP through mmengine's pytorch launcher, 2 processes on the CPU (gloo)

# mmengine 0.10.7's pytorch launcher assumes GPUs; tools/train.py starts gloo itself and wraps the
# model with CPUDistributedDataParallel when CUDA is absent (mmquant/engine/cpu_ddp.py). This shim
# only registers a probe that writes every rank's quantizer state, then runs tools/train.py unchanged.
DDP_SHIM = """
import os, runpy, sys
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankProbeHook(Hook):
    priority = 'LOWEST'

    def save(self, runner, when):
        model = runner.model.module
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if 'quantizer' in k}
        torch.save(state, os.path.join(runner.work_dir, f'{when}_rank{os.environ["RANK"]}.pth'))

    def before_train(self, runner):
        self.save(runner, 'start')

    def after_train(self, runner):
        self.save(runner, 'end')


sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
torch.distributed.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_broadcasts_the_calibration(qat_env, tmp_path):
    shim = tmp_path / 'ddp_shim.py'
    shim.write_text(DDP_SHIM)
    extra = "custom_hooks = [dict(type='RankProbeHook')]\n" + NO_VAL
    cfg = qat_env['qat_config']('lsq_w4a4', iters=1, interval=1, extra=extra)
    work = tmp_path / 'ddp'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--monitor_interval', '0.1',
         '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
         str(shim), 'tools/train.py', cfg, '--launcher', 'pytorch', '--work-dir', str(work)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = log_text(work)
    assert 'Distributed launcher: pytorch' in log and 'GPU number: 2' in log   # mmengine's world size
    assert 'mmquant: calibrated 21 layers' in log
    start = [torch.load(work / f'start_rank{r}.pth', weights_only=True) for r in (0, 1)]
    end = [torch.load(work / f'end_rank{r}.pth', weights_only=True) for r in (0, 1)]
    keys = quant_keys(start[0])
    assert len(keys) > 0
    assert_same(start[0], start[1], keys)      # each rank calibrated on its own shard: rank 0's won
    assert_same(end[0], end[1], keys)          # and they stayed in step
    saved = load(work / 'iter_1.pth')['state_dict']
    assert_same(saved, end[0], keys)
    steps = [k for k in keys if k.endswith('.step')]
    assert all(torch.isfinite(saved[k]).all() and saved[k].gt(0).all() for k in steps)
    assert any(not torch.equal(start[0][k], saved[k]) for k in steps)


# ----------------------------------------------------------------------------------------------
# 8. one-line CLI errors


CLI_ERRORS = [
    (['--quant', 'lsq', '--quant-bits', 'w1a1'],
     'error: w_bits=1 is out of range for the lsq quantizer: accepted 2..16'),
    (['--quant', 'xnor', '--quant-bits', 'w2a2'],
     'error: w_bits=2 is out of range for the xnor quantizer: it is 1-bit only'),
    (['--quant', 'nosuchmethod'], "error: unknown quantization method 'nosuchmethod'; accepted for training: "
                                  'bireal, dorefa, f8net, groupnet, lqnet, lsq, pact, sat, xnor, xnorpp (QAT)'),
]


@pytest.mark.parametrize('args, message', CLI_ERRORS)
def test_train_cli_errors_are_one_line(args, message, capsys):
    """In this process (a subprocess costs ~7 s of imports; test_tools.py checks that those imports
    leave stderr empty, so a real process prints just this line)."""
    with pytest.raises(SystemExit) as e:
        TRAIN.main(['configs/resnet18_fashionmnist.py', *args])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count('\n') == 1 and err.startswith(message), err

