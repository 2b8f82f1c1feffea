"""Integer-only ONNX export: the requantisation arithmetic against closed forms, the op census
(no float between the input QuantizeLinear and the output DequantizeLinear), onnxruntime against
the PyTorch integer simulator bit for bit, and both against the fake-quant model."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mmquant import quantize
from mmquant.export import IntegerSimulator, IntExportError, export_int, multiplier_census, op_census
from mmquant.export.int_graph import requant_params
from mmquant.qat import prepare_qat


class ResNetLike(nn.Module):
    """Stem (conv, BN, ReLU, max-pool), one residual block, global pool, linear: every op the
    integer lowering has a rule for."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def run_ort(path, x):
    return ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]


def run_checked(path, x, model=None, atol=1e-5):
    """onnxruntime's output of the integer graph at ``path`` on ``x``, after asserting it equals
    the integer simulator bit for bit and (with ``model``) the fake-quant model within ``atol``
    (a callable of the reference gives a relative bound)."""
    out = run_ort(path, x)
    np.testing.assert_array_equal(out, IntegerSimulator(onnx.load(path))(x).numpy())
    if model is not None:
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(out, ref, atol=atol(ref) if callable(atol) else atol, rtol=0)
    return out


def multipliers(path):
    """|m| of every requantisation multiplier of the integer graph at ``path``."""
    return [np.abs(onnx.numpy_helper.to_array(t).astype(np.float64)) for t in onnx.load(path).graph.initializer
            if t.name.startswith('mult')]


def is_power_of_two(v):
    return bool(np.all(np.exp2(np.round(np.log2(v))) == v))


def quantized(bits='w8a8', per_channel=True, size=12, **kw):
    model = ResNetLike()
    batches = [torch.randn(8, 3, size, size) for _ in range(2)]
    quantize(model, batches, 'minmax', bits, qconfig=dict(default=dict(w_per_channel=per_channel),
                                                          first_layer_bits=None, last_layer_bits=None), **kw)
    return model, batches


@pytest.mark.parametrize('ratio', [0.3, 1.7e-4, 3.0, 0.999999])
def test_requant_multiplier_and_shift(ratio):
    m, n = requant_params(np.array([ratio]))
    assert 0 < m[0] < 2 ** 31 and abs(m[0] / 2 ** n - ratio) <= 2.0 ** -n
    x = np.arange(-100000, 100000, 37, dtype=np.int64)
    y = (x * m[0] + (1 << (n - 1))) >> n                        # what the graph computes
    exact = x * ratio
    assert np.abs(y - exact).max() <= 0.5 + 1e-6 * np.abs(exact).max()


def test_power_of_two_ratios_are_shifts():
    m, n = requant_params(np.array([2.0 ** -7, 2.0 ** -3, 2.0 ** 2]))
    assert m.tolist() == [1, 16, 512] and n == 7               # one shift, power-of-two factors
    m, n = requant_params(np.array([-0.5]))
    assert m.tolist() == [-1] and n == 1


@pytest.mark.parametrize('bits, per_channel', [('w8a8', True), ('w8a8', False), ('w4a4', True), ('w2a2', True)])
def test_integer_graph_matches_simulator_bit_for_bit(tmp_path, bits, per_channel):
    model, batches = quantized(bits, per_channel)
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    graph = onnx.load(path)
    # float only where the graph starts and ends
    assert op_census(graph) == {'QuantizeLinear': [graph.graph.node[0].name],
                                'DequantizeLinear': [graph.graph.node[-2].name],
                                'Identity': [graph.graph.node[-1].name]}
    ops = {n.op_type for n in graph.graph.node}
    assert {'ConvInteger', 'MatMulInteger', 'BitShift'} <= ops and not ops & {'Conv', 'BatchNormalization', 'Gemm'}
    # each integer node is named after the QDQ node it lowers (so profiles group it by layer)
    convs = [n.name for n in graph.graph.node if n.op_type == 'ConvInteger']
    assert convs and all(name.startswith('/') and '/Conv' in name for name in convs), convs
    # the integer arithmetic lands on the fake-quant model's codes (bias and BatchNorm are added
    # below one output step, residual sums kept to 2^-30 of their range)
    run_checked(path, torch.randn(16, 3, 12, 12), model)
    assert not list(tmp_path.glob('*.tmp'))


def test_folded_batchnorm_model_exports(tmp_path):
    model, batches = quantized('w8a8', fold_bn=True)
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    run_checked(path, torch.randn(8, 3, 12, 12), model)


def test_power_of_two_grids_requantise_by_shifts_only(tmp_path):
    # BatchNorm folded, every scale rounded to a power of two (a fixed-point model), and an 8x8
    # input so that the global pool averages 4x4 = 2^4 values
    model, batches = quantized('w8a8', per_channel=True, size=8, fold_bn=True)
    for m in model.modules():
        for q in (getattr(m, 'weight_quantizer', None), getattr(m, 'input_quantizer', None)):
            if q is not None:
                q.scale.copy_(2.0 ** torch.round(torch.log2(q.scale)))
                q.zero_point.zero_()
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    mults = multipliers(path)
    assert mults and all(is_power_of_two(m) for m in mults)
    run_checked(path, torch.randn(8, 3, 8, 8))


def test_lsq_qat_model_exports(tmp_path):
    model = ResNetLike()
    prepare_qat(model, 'lsq', 'w4a4', qconfig=dict(first_layer_bits=None, last_layer_bits=None))
    x = torch.randn(8, 3, 12, 12)
    model.train()
    model(x)
    model.eval()
    run_checked(export_int(model, x, str(tmp_path / 'int.onnx')), x)


def test_weight_only_model_is_refused_with_the_node(tmp_path):
    model, batches = quantized('w4')
    with pytest.raises(IntExportError, match='not quantized'):
        export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    assert not list(tmp_path.iterdir())


def test_affine_weights_are_refused(tmp_path):
    model = ResNetLike()
    batches = [torch.randn(8, 3, 12, 12)]
    quantize(model, batches, 'minmax', 'w8a8', qconfig=dict(default=dict(w_symmetric=False)))
    with pytest.raises(IntExportError, match='symmetric'):
        export_int(model, batches[0], str(tmp_path / 'int.onnx'))


def test_convolution_on_a_1x1_map_becomes_one_matmul(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)).eval()
    batches = [torch.randn(16, 3, 1, 1)]
    quantize(model, batches, 'minmax', 'w8a8', qconfig=dict(default=dict(w_per_channel=True)))
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    graph = onnx.load(path)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count('MatMulInteger') == 2 and 'ConvInteger' not in ops      # the 1x1 conv too
    run_checked(path, torch.randn(5, 3, 1, 1), model)


def test_f8net_post_training_model_requantises_by_shifts_only(tmp_path):
    # F8Net's fixed-point grids: every scale a power of two; the global pool averages 2^4 values
    model = ResNetLike()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    quantize(model, batches, 'f8net', 'w8a8', qconfig=dict(first_layer_bits=None, last_layer_bits=None))
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    assert all(is_power_of_two(m) for m in multipliers(path))
    run_checked(path, torch.randn(8, 3, 8, 8), model)


def test_f8net_qat_model_with_pact_clipping_exports(tmp_path):
    model = ResNetLike()
    example = torch.randn(8, 3, 12, 12)
    prepare_qat(model, 'f8net', 'w8a8', example_forward=lambda: model(example))
    model.train()
    model(example)
    model.eval()
    path = export_int(model, example, str(tmp_path / 'int.onnx'))
    run_checked(path, torch.randn(8, 3, 12, 12), model, atol=lambda ref: 1e-4 * np.abs(ref).max())


@pytest.mark.parametrize('fold', [False, True])
def test_f8net_qat_model_with_the_clip_folded_requantises_by_shifts_only(tmp_path, fold):
    # PACT's alpha / qmax in the producers' weights: every multiplier a power of two (8x8 input: the
    # global pool averages 2^4 values); without the fold the layers' readers need multipliers
    model = ResNetLike()
    example = torch.randn(8, 3, 8, 8)
    prepare_qat(model, 'f8net', 'w8a8', example_forward=lambda: model(example), fold_clip=fold)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, 8, 8))
    model.eval()
    path = export_int(model, example, str(tmp_path / 'int.onnx'))
    mults = multipliers(path)
    assert mults and all(is_power_of_two(m) for m in mults) == fold
    n, k = multiplier_census(onnx.load(path))
    assert n == len(mults) and k == sum(is_power_of_two(m) for m in mults)
    # equal to the fake-quant model on 1024 images: the shifts as short as 1 bit keep the biases at
    # 2^-29 of a step (rounded to 2^-n, 5 of these 5120 outputs moved by 0.3%)
    run_checked(path, torch.randn(1024, 3, 8, 8), model, atol=lambda ref: 1e-6 * np.abs(ref).max())


class InvertedResidualLike(nn.Module):
    """MobileNetV2's block: 1x1 expand, ReLU6, depthwise 3x3, ReLU6, 1x1 project, residual add."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.dw, self.bn2 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.project, self.bn3 = nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        for bn in (self.bn0, self.bn1, self.bn2, self.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(2.0, 4.0)        # large enough that ReLU6 clips some values
            bn.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        x = nn.functional.relu6(self.bn0(self.stem(x)))
        y = nn.functional.relu6(self.bn1(self.expand(x)))
        y = nn.functional.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize('fold_bn', [False, True])
def test_depthwise_and_relu6_export_and_the_cap_clips_a_wider_grid(tmp_path, fold_bn):
    model = InvertedResidualLike()
    batches = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    quantize(model, batches, 'minmax', 'w8a8', qconfig=dict(first_layer_bits=None, last_layer_bits=None),
             fold_bn=fold_bn)
    with torch.no_grad():   # the depthwise conv's input grid now reaches 10.2: only the ReLU6 cap stops at 6
        model.dw.input_quantizer.scale.mul_(1.7)    # (not 2: 6 / scale would sit on a rounding tie)
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    graph = onnx.load(path)
    assert [n for n in graph.graph.node if n.op_type == 'ConvInteger' and
            any(a.name == 'group' and a.i == 24 for a in n.attribute)]
    x = torch.randn(8, 3, 10, 10)
    run_checked(path, x, model, atol=1e-5)
    seen = []
    handle = model.dw.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(float(i[0].max())))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [6.0]                             # values were clipped by the cap, not the grid


def test_clip_with_a_nonzero_lower_bound_is_refused(tmp_path):
    class Hardtanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = torch.clamp(self.conv(x), -1.0, 1.0)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    model = Hardtanh().eval()
    batches = [torch.randn(4, 3, 8, 8)]
    quantize(model, batches, 'minmax', 'w8a8')
    with pytest.raises(IntExportError, match='a Clip with a lower bound other than 0'):
        export_int(model, batches[0], str(tmp_path / 'int.onnx'))
