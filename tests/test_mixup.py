"""Mixup in QAT through mmpretrain's batch augments: the recipe config builds a quantized
classifier whose training batches are mixed (inputs and soft targets) and whose loss trains."""
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.structures import DataSample

import mmquant  # noqa: F401
from mmquant.calibrate import calibrate
from mmquant.convert import quant_layers
from mmquant.engine.cli import apply_qat
from mmquant.engine.model import build_quantized_model

from conftest import ROOT

CFG = osp.join(ROOT, 'configs', 'resnet18_fashionmnist_lsq_w2a2_mixup.py')


def build():
    cfg = Config.fromfile(CFG)
    apply_qat(cfg)
    init_default_scope('mmpretrain')
    kw = {k: v for k, v in cfg.model.items() if k != 'type'}
    torch.manual_seed(0)
    return cfg, build_quantized_model(data_preprocessor=cfg.get('data_preprocessor'), **kw)


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8) for _ in range(n)]
    samples = [DataSample().set_gt_label(i % 10) for i in range(n)]
    return dict(inputs=inputs, data_samples=samples)


def test_mixup_recipe_config():
    cfg = Config.fromfile(CFG)
    assert cfg.quant.method == 'lsq' and cfg.quant.bits == 'w2a2'
    assert cfg.model.train_cfg == dict(augments=dict(type='Mixup', alpha=0.2))
    assert cfg.model.head.loss.use_soft


def test_training_batches_are_mixed_and_the_quantized_model_trains():
    cfg, model = build()
    assert cfg.quant.method == 'lsq' and len(quant_layers(model)) == 21
    plain = model.data_preprocessor(batch(), training=False)
    labels = torch.tensor([i % 10 for i in range(8)])
    onehot = torch.stack([s.gt_score for s in plain['data_samples']]).float()
    torch.testing.assert_close(onehot, torch.eye(10)[labels])    # evaluation: one-hot, not mixed
    torch.manual_seed(1)
    mixed = model.data_preprocessor(batch(), training=True)
    scores = torch.stack([s.gt_score for s in mixed['data_samples']])
    assert scores.shape == (8, 10)
    torch.testing.assert_close(scores.sum(1), torch.ones(8))
    # every row mixes its own label with a partner's: weight lam on the own label
    # each row mixes two labels: lam on the row's own, 1 - lam on its partner's (same lam for all)
    own = scores[torch.arange(8), labels]
    assert ((scores > 0).sum(1) <= 2).all() and not torch.equal(scores, torch.eye(10)[labels])
    lam = own.min().item()
    assert 0 < lam < 1 and torch.isclose(scores.max(1).values.min(), torch.tensor(max(lam, 1 - lam)))
    assert not torch.equal(mixed['inputs'], plain['inputs'])
    model.train()
    calibrate(model, [plain['inputs']], lambda m, x: m(x, mode='tensor'))
    loss = model.loss(mixed['inputs'], mixed['data_samples'])['loss']
    assert torch.isfinite(loss)
    loss.backward()
    steps = [p for n, p in model.named_parameters() if 'quantizer' in n]
    assert steps and all(p.grad is not None for p in steps)
