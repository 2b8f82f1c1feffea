"""BatchNorm folding: exact on stock models, refused (and undone) where a conv output has two users."""
import pytest
import torch
from torch import nn

from mmquant.fold_bn import find_conv_bn_pairs, fold_bn

from conftest import randomise_bn
from test_mm_models import CLASSIFIERS, DETECTORS, build, cls_batch, det_batch
from mmquant.engine import tensor_forward


def test_fold_resnet18_exactly_and_bn_becomes_identity(tmp_path):
    model = build(tmp_path, CLASSIFIERS['resnet18'], 'mmpretrain')
    randomise_bn(model, seed=0)
    batch = cls_batch(size=32)
    with torch.no_grad():
        ref = tensor_forward(model, batch)
    pairs = fold_bn(model, lambda: tensor_forward(model, batch))
    assert len(pairs) == 20 and ('backbone.conv1', 'backbone.bn1') in pairs          # 17 convs + 3 downsamples
    assert ('backbone.layer2.0.downsample.0', 'backbone.layer2.0.downsample.1') in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.backbone.conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(tensor_forward(model, batch), ref, atol=1e-4, rtol=1e-4)


def test_fold_retinanet_backbone_and_convmodules(tmp_path):
    model = build(tmp_path, DETECTORS['retinanet_r18'], 'mmdet')
    batch = det_batch()
    pairs = find_conv_bn_pairs(model, lambda: tensor_forward(model, batch))
    assert len(pairs) == 20 and all(c.startswith('backbone.') for c, _ in pairs)
    assert fold_bn(model, lambda: tensor_forward(model, batch)) == pairs


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y                  # the conv output also feeds the add


def test_a_conv_output_with_two_users_is_refused_and_left_unchanged():
    torch.manual_seed(0)
    model = TwoUsers().eval()
    randomise_bn(model, seed=0)
    x = torch.randn(2, 3, 8, 8)
    w, b = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(RuntimeError, match='fold_bn: folding changed the model output'):
        fold_bn(model, lambda: model(x))
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(model.conv.weight, w) and torch.equal(model.conv.bias, b)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
