"""Knowledge distillation from the float model during QAT: the loss against its closed form, the
distilled classifier's loss against an independent computation, the teacher kept out of the
student (state_dict, parameters, optimizer, init_weights), the one-line errors, and a few
iterations of tools/train.py with the KD recipe whose checkpoint tools/test.py evaluates without
the teacher.

The tools run in this process, on the first 256 training and 64 test images of Fashion-MNIST
written as small idx files (as in test_qat_engine.py).
"""
import copy
import glob
import importlib.util
import itertools
import math
import os
import os.path as osp
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint
from mmpretrain.structures import DataSample
from torch import nn

import mmquant  # noqa: F401  (registers the entry points, allow-lists checkpoint classes)
from mmquant.calibrate import calibrate
from mmquant.engine.cli import apply_qat
from mmquant.engine.distill import DistilledLoss, attach_distillation, check_distill, distilled
from mmquant.engine.ptq_loop import unwrap
from mmquant.qat.distill import distill_loss

from conftest import ROOT, randomise_bn, write_config, write_small_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ARCH = dict(type='ImageClassifier',
            backbone=dict(type='ResNet', depth=18, in_channels=1),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=512,
                      loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
_IDS = itertools.count()


def one_line(e) -> str:
    msg = str(e.value)
    assert '\n' not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# 1. distill_loss against its closed form


def test_equal_logits_give_zero():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)) * 3
    for t in (1.0, 4.0):
        assert distill_loss(logits, logits.clone(), t).abs().item() < 1e-6


def test_two_class_case_by_hand():
    # teacher softmax [3/4, 1/4] at T=1, student uniform: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    expect = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distill_loss(s, t, 1.0).item() == pytest.approx(expect, rel=1e-6)
    # T=2: the teacher's logits halve, softmax [sqrt3, 1] / (sqrt3 + 1); the KL times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expect2 = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert distill_loss(s, t, 2.0).item() == pytest.approx(expect2, rel=1e-6)
    # averaged over the batch: a second, identical-logits row halves it
    s2, t2 = torch.tensor([[0.0, 0.0], [1.0, -1.0]]), torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]])
    assert distill_loss(s2, t2, 1.0).item() == pytest.approx(expect / 2, rel=1e-6)


def test_gradient_reaches_the_student_only_and_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, generator=g).requires_grad_()
    t = torch.randn(4, 5, generator=g).requires_grad_()
    temp = 3.0
    distill_loss(s, t, temp).backward()
    assert t.grad is None
    # d/ds [T^2 KL(p_t || p_s)] averaged over N rows = T (p_s - p_t) / N
    expect = temp * (F.softmax(s.detach() / temp, -1) - F.softmax(t.detach() / temp, -1)) / 4
    assert torch.allclose(s.grad, expect, atol=1e-6)


def test_temperature_squared_scaling():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    for temp in (0.5, 2.0, 8.0):
        # T^2 * KL at T equals T^2 times the T=1 loss of the logits divided by T
        assert distill_loss(s, t, temp).item() == pytest.approx(temp ** 2 * distill_loss(s / temp, t / temp, 1.0).item(),
                                                               rel=1e-5)
    # the T^2 factor keeps the loss finite and non-vanishing as T grows (-> the logits' MSE / 2C
    # for zero-mean logits, Hinton et al. section 2.1)
    sc, tc = (v.double() - v.double().mean(-1, keepdim=True) for v in (s, t))     # float64: KL ~ 1e-7 at T=1000
    limit = ((sc - tc) ** 2).sum(-1).mean().item() / (2 * 7)
    assert distill_loss(sc, tc, 1000.0).item() == pytest.approx(limit, rel=1e-2)
    with pytest.raises(ValueError, match='temperature=0 must be > 0'):
        distill_loss(s, t, 0)
    with pytest.raises(ValueError, match='differ in shape'):
        distill_loss(s, t[:, :3], 1.0)


@pytest.mark.parametrize('distill, match', [
    (dict(weight=0), "distill weight=0 is out of range: accepted a finite number > 0"),
    (dict(weight=-1.0), "distill weight=-1.0 is out of range"),
    (dict(temperature=0.0), "distill temperature=0.0 is out of range: accepted a finite number > 0"),
    (dict(temperature='4'), "distill temperature='4' is out of range"),
    (dict(temperature=float('inf')), "distill temperature=inf is out of range"),
    (dict(alpha=0.5), r"distill has unknown keys \['alpha'\]; accepted: checkpoint, weight, temperature"),
])
def test_settings_are_validated_in_one_line(tmp_path, distill, match):
    ckpt = tmp_path / 'float.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(ValueError, match=match) as e:
        check_distill(dict(dict(checkpoint=str(ckpt)), **distill))
    one_line(e)


# ----------------------------------------------------------------------------------------------
# 2. the distilled classifier


@pytest.fixture(scope='module')
def float_ckpt(tmp_path_factory):
    """A float checkpoint of ARCH (non-trivial BatchNorms), as mmengine writes one."""
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(ARCH)
    randomise_bn(model)
    path = tmp_path_factory.mktemp('distill') / 'float.pth'
    torch.save(dict(meta=dict(epoch=1), state_dict=model.state_dict()), path)
    return str(path)


def build(distill=None, method='lsq', bits='w2a2'):
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    cfg = dict(type='QuantizedModel', architecture=ARCH, method=method, bits=bits,
               data_preprocessor=dict(type='ClsDataPreprocessor', mean=[0.0], std=[1.0]))
    if distill is not None:
        cfg['distill'] = distill
    return MODELS.build(cfg)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (n, ), generator=g)
    return x, labels, [DataSample().set_gt_label(int(y)) for y in labels]


def test_loss_kd_equals_distill_loss_of_the_two_models(float_ckpt):
    weight, temp = 0.5, 3.0
    model = build(dict(checkpoint=float_ckpt, weight=weight, temperature=temp))
    x, labels, samples = batch()
    calibrate(model, [x], forward_fn=lambda m, b: m(b, mode='tensor'))
    model.train()
    kd = distilled(model)
    assert isinstance(kd, DistilledLoss) and not kd.teacher.training
    assert all(not p.requires_grad for p in kd.teacher.parameters())
    assert model.mmquant_qat['distill'] == dict(checkpoint=float_ckpt, weight=weight, temperature=temp)

    losses = model(x, samples, mode='loss')
    assert set(losses) == {'loss', 'loss_kd'}
    # independently: the student's logits (same train-mode forward), and a float model built and
    # loaded on its own
    with torch.no_grad():
        student = model(x, mode='tensor')
        init_default_scope('mmpretrain')
        teacher = MODELS.build(ARCH)
        load_checkpoint(teacher, float_ckpt, map_location='cpu', strict=True, logger='silent')
        teacher.eval()
        teacher_logits = teacher(x, mode='tensor')
    expect = weight * distill_loss(student, teacher_logits, temp)
    assert losses['loss_kd'].item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
    assert losses['loss_kd'].item() > 0
    assert losses['loss'].item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-5)
    # the teacher is the checkpoint's float model, untouched by the student's conversion
    for (k, v), (k2, v2) in zip(kd.teacher.state_dict().items(), teacher.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not any('quantizer' in k for k in kd.teacher.state_dict())
    # the gradient of loss_kd reaches the student, not the teacher
    losses['loss_kd'].backward()
    assert model.head.fc.weight.grad is not None and model.head.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in kd.teacher.parameters())


def test_teacher_is_outside_state_dict_parameters_and_optimizer(float_ckpt):
    plain, kd_model = build(), build(dict(checkpoint=float_ckpt, temperature=4.0))
    assert list(plain.state_dict()) == list(kd_model.state_dict())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in kd_model.named_parameters()]
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in kd_model.named_modules()]
    teacher = distilled(kd_model).teacher
    own = {id(p) for p in kd_model.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    optim = torch.optim.SGD(kd_model.parameters(), lr=0.1)
    in_optim = {id(p) for g in optim.param_groups for p in g['params']}
    assert not any(id(p) in in_optim for p in teacher.parameters())
    # the student's train() / eval() / init_weights() / to() leave the teacher alone
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd_model.train()
    kd_model.init_weights()
    kd_model.to(torch.float64).to(torch.float32)
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # a checkpoint of the student loads into a model built without distillation, strictly
    plain.load_state_dict(kd_model.state_dict(), strict=True)
    # a deep copy (EMA) distils its own copy against its own teacher
    twin = copy.deepcopy(kd_model)
    assert distilled(twin).student is twin and distilled(twin).teacher is not teacher


def test_ddp_wrapped_student_trains_with_loss_kd(float_ckpt):
    """One gloo process: DDP registers the student's parameters only and its train_step logs loss_kd."""
    import socket
    import torch.distributed as dist
    from mmengine.optim import OptimWrapper
    from mmquant.engine.cpu_ddp import CPUDistributedDataParallel
    model = build(dict(checkpoint=float_ckpt, temperature=2.0))
    x, _, samples = batch()
    calibrate(model, [x], forward_fn=lambda m, b: m(b, mode='tensor'))
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        ddp = CPUDistributedDataParallel(module=model)
        teacher = distilled(model).teacher
        wrapped = {id(p) for p in ddp.parameters()}
        assert not any(id(p) in wrapped for p in teacher.parameters())
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        optim = OptimWrapper(torch.optim.SGD(ddp.parameters(), lr=0.01))
        logs = ddp.train_step(dict(inputs=list(x), data_samples=samples), optim)
        assert set(logs) == {'loss', 'loss_kd'} and logs['loss_kd'].item() > 0
        assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_teacher_follows_the_student_to_the_gpu(float_ckpt):
    model = build(dict(checkpoint=float_ckpt))
    x, _, samples = batch()
    calibrate(model, [x], forward_fn=lambda m, b: m(b, mode='tensor'))
    teacher = distilled(model).teacher
    cpu = model(x, samples, mode='loss')['loss_kd']
    model.cuda()
    assert next(teacher.parameters()).device.type == 'cpu'     # lazily: at the next training forward
    gpu = model(x.cuda(), [s.to('cuda') for s in samples], mode='loss')['loss_kd']
    assert next(teacher.parameters()).is_cuda and all(b.is_cuda for b in teacher.buffers())
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-3, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. one-line errors


@MODELS.register_module(force=True)
class DistillToyDetector(BaseModel):
    """Detector-like: neither ``extract_feat`` nor ``head``."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bbox_head = nn.Conv2d(4, 4, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.bbox_head(self.conv(inputs))


def test_detector_like_model_gets_the_classifiers_only_error(float_ckpt):
    init_default_scope('mmpretrain')
    with pytest.raises(ValueError, match='distillation supports classifiers only .* DistillToyDetector is not one') as e:
        MODELS.build(dict(type='QuantizedModel', architecture=dict(type='DistillToyDetector'), method='lsq',
                          bits='w4a4', distill=dict(checkpoint=float_ckpt)))
    one_line(e)
    with pytest.raises(ValueError, match='distillation supports classifiers only .* Linear is not one') as e:
        attach_distillation(nn.Linear(2, 2), nn.Linear(2, 2))
    one_line(e)


def test_missing_teacher_checkpoint_is_one_line():
    path = '/nonexistent/float_teacher.pth'
    with pytest.raises(ValueError, match=f"distill checkpoint '{path}' does not exist") as e:
        build(dict(checkpoint=path))
    one_line(e)


def test_wrong_teacher_checkpoint_is_one_line(float_ckpt, tmp_path):
    state = torch.load(float_ckpt, weights_only=True)['state_dict']
    state['head.fc.weight_quantizer.step'] = torch.ones(1)       # a quantized checkpoint's key
    path = tmp_path / 'qat.pth'
    torch.save(dict(state_dict=state), path)
    with pytest.raises(ValueError, match="is not a float checkpoint of this architecture: 0 keys missing, "
                                         "1 unexpected") as e:
        build(dict(checkpoint=str(path)))
    one_line(e)


# ----------------------------------------------------------------------------------------------
# 4. the tools: tools/train.py with the KD recipe, tools/test.py without the teacher


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'mmquant_tools_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN, TEST = _load_tool('train'), _load_tool('test')


SMALL = """
_base_ = ['{base}']
data_root = '{data}'
train_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=[dict(type='PackInputs')]))
val_dataloader = dict(batch_size=64, num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
param_scheduler = []
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={iters}), logger=dict(interval=1))
val_dataloader = val_cfg = val_evaluator = None
"""


def log_text(work_dir) -> str:
    return ''.join(open(f).read() for f in sorted(glob.glob(osp.join(str(work_dir), '*', '*.log'))))


@pytest.fixture(scope='module')
def tools_env(tmp_path_factory, fashion_mnist):
    tmp = tmp_path_factory.mktemp('distill_tools')
    data = tmp / 'data'
    data.mkdir()
    write_small_fashion_mnist(data, fashion_mnist, 256, 64)
    float_cfg = write_config(tmp, SMALL.format(base=f'{ROOT}/configs/resnet18_fashionmnist.py', data=data, iters=2),
                             'float.py')
    TRAIN.main([float_cfg, '--work-dir', str(tmp / 'float'), '--cfg-options', f'experiment_name=kd{next(_IDS)}'])
    return dict(tmp=tmp, data=str(data), float_ckpt=str(tmp / 'float' / 'iter_2.pth'))


def kd_config(env, teacher, iters=2):
    text = SMALL.format(base=f'{ROOT}/configs/resnet18_fashionmnist_lsq_w2a2_kd.py', data=env['data'], iters=iters)
    text += f"load_from = '{env['float_ckpt']}'\nquant = dict(calib_batches=1, distill=dict(checkpoint='{teacher}'))\n"
    return write_config(env['tmp'], text, f'kd_{next(_IDS)}.py')


def test_kd_recipe_config(float_ckpt):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'resnet18_fashionmnist_lsq_w2a2_kd.py'))
    assert cfg.quant.method == 'lsq' and cfg.quant.bits == 'w2a2'
    assert cfg.quant.distill == dict(checkpoint='work_dirs/resnet18_fashionmnist/epoch_8.pth', weight=1.0,
                                     temperature=4.0)
    assert cfg.load_from == cfg.quant.distill.checkpoint          # the float recipe's output
    cfg.quant.distill.checkpoint = float_ckpt
    apply_qat(cfg)
    assert cfg.model.type == 'QuantizedModel' and cfg.model.method == 'lsq' and cfg.model.bits == 'w2a2'
    assert cfg.model.distill == dict(checkpoint=float_ckpt, weight=1.0, temperature=4.0)


def test_train_with_distillation_logs_loss_kd_and_test_needs_no_teacher(tools_env, tmp_path):
    teacher = tmp_path / 'teacher.pth'
    shutil.copy(tools_env['float_ckpt'], teacher)
    work = tmp_path / 'kd'
    runner = TRAIN.main([kd_config(tools_env, teacher), '--work-dir', str(work), '--cfg-options',
                         f'experiment_name=kd{next(_IDS)}'])
    log = log_text(work)
    assert (f'mmquant: knowledge distillation from the float model {teacher}: loss_kd weight 1.0, '
            'temperature 4.0') in log
    values = [float(v) for v in re.findall(r'loss_kd: ([0-9.e+-]+)', log)]
    assert len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values), log[-2000:]
    model = unwrap(runner.model)
    assert isinstance(distilled(model), DistilledLoss) and distilled(model).temperature == 4.0
    ckpt = torch.load(work / 'iter_2.pth', map_location='cpu', weights_only=True)
    meta = ckpt['meta']['mmquant_qat']
    assert meta['method'] == 'lsq' and meta['bits'] == 'w2a2'
    assert meta['distill'] == dict(checkpoint=str(teacher), weight=1.0, temperature=4.0)
    float_keys = set(torch.load(tools_env['float_ckpt'], map_location='cpu', weights_only=True)['state_dict'])
    assert {k for k in ckpt['state_dict'] if 'quantizer' not in k} == float_keys      # no teacher keys
    # evaluation rebuilds the model from the meta without the teacher (its file is gone)
    os.remove(teacher)
    result = TEST.main([kd_config(tools_env, teacher), str(work / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test'),
                        '--cfg-options', f'experiment_name=kd{next(_IDS)}'])
    assert 0 <= result['metrics']['accuracy/top1'] <= 100
    assert 'loss_kd' not in log_text(tmp_path / 'test')


def test_train_cli_missing_teacher_checkpoint_is_one_line(capsys):
    path = '/nonexistent/epoch_8.pth'
    with pytest.raises(SystemExit) as e:
        TRAIN.main([osp.join(ROOT, 'configs', 'resnet18_fashionmnist_lsq_w2a2_kd.py'),
                    '--cfg-options', f'quant.distill.checkpoint={path}'])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count('\n') == 1
    assert err.startswith(f"error: distill checkpoint '{path}' does not exist"), err
    with pytest.raises(SystemExit):
        TRAIN.main([osp.join(ROOT, 'configs', 'resnet18_fashionmnist_lsq_w2a2_kd.py'),
                    '--cfg-options', 'quant.distill.temperature=0'])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: distill temperature=0 is out of range'), err


def test_straight_through_training_takes_distill_too(float_ckpt):
    cfg = Config(dict(model=dict(type='ImageClassifier'), quant=dict(distill=dict(checkpoint=float_ckpt))))
    TRAIN.wrap_for_qat(cfg, 'minmax', 'w4a4')
    assert cfg.model.type == 'QuantizedModel'
    assert cfg.model.distill == dict(checkpoint=float_ckpt, weight=1.0, temperature=1.0)
