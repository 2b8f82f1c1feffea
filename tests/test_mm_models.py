"""Stock mmpretrain / mmdet models (random init, built from their own configs) convert fully and
still predict on the CPU, in every mode."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmquant  # noqa: F401
from mmquant import QConfig, convert
from mmquant.calibrate import calibrate
from mmquant.convert import quant_layers
from mmquant.engine import tensor_forward
from mmengine.registry import MODELS

from conftest import ROOT, write_config

CLASSIFIERS = {
    'resnet18': 'mmpretrain::_base_/models/resnet18.py',
    'resnet50': 'mmpretrain::_base_/models/resnet50.py',
    'vgg11bn': 'mmpretrain::_base_/models/vgg11bn.py',
}
DETECTORS = {
    'retinanet_r18': 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
    'fcos_r50': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    'mask_rcnn_r50': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    # our recipes on the local detection set (BlendMask is mmquant's own model)
    **{f'{n}_fashiondet': osp.join(ROOT, 'configs', f'{n}_r18_fpn_fashiondet.py')
       for n in ('retinanet', 'fcos', 'mask-rcnn', 'blendmask')},
}


def build(tmp_path, base, scope):
    cfg = Config.fromfile(write_config(tmp_path, f"_base_ = '{base}'\n"))
    init_default_scope(scope)
    model_cfg = cfg.model
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    return MODELS.build(model_cfg).eval()


def float_convs(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) and not isinstance(m, mmquant.nn.QUANT_LAYERS)]


def cls_batch(n=2, size=64):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    return dict(inputs=[torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8) for _ in range(n)],
                data_samples=[DataSample().set_gt_label(i % 3) for i in range(n)])


def det_batch(size=128):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(0)
    sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                                         pad_shape=(size, size), batch_input_shape=(size, size)))
    inst = InstanceData()
    inst.bboxes = torch.tensor([[10.0, 10.0, 60.0, 70.0]])
    inst.labels = torch.tensor([1])
    mask = np.zeros((1, size, size), dtype=np.uint8)
    mask[0, 10:70, 10:60] = 1
    inst.masks = BitmapMasks(mask, size, size)
    sample.gt_instances = inst
    return dict(inputs=[torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)],
                data_samples=[sample])


@pytest.mark.parametrize('name', sorted(CLASSIFIERS))
def test_classifier_fully_swapped_and_predicts(tmp_path, name):
    model = build(tmp_path, CLASSIFIERS[name], 'mmpretrain')
    batch = cls_batch(size=224 if name == 'vgg11bn' else 64)
    report = convert(model, QConfig.build(bits='w4a4'), example_forward=lambda: tensor_forward(model, batch))
    assert float_convs(model) == [] and report.kept_float == []
    assert report.first_layers == ['backbone.conv1' if 'resnet' in name else 'backbone.features.0.conv']
    calibrate(model, [batch], forward_fn=tensor_forward)
    with torch.no_grad():
        preds = model.test_step(batch)
        losses = model(**model.data_preprocessor(batch, True), mode='loss')
    assert len(preds) == 2 and preds[0].pred_score.shape[-1] == 1000
    assert torch.isfinite(losses['loss'])


@pytest.mark.parametrize('name', sorted(DETECTORS))
def test_detector_fully_swapped_and_predicts(tmp_path, name):
    model = build(tmp_path, DETECTORS[name], 'mmdet')
    batch = det_batch()
    report = convert(model, QConfig.build(bits='w4a8'), example_forward=lambda: tensor_forward(model, batch))
    # every conv / linear of backbone, neck, heads and RoI heads (Mask R-CNN's transposed-conv
    # mask upsampler too) is quantized
    assert float_convs(model) == [] and report.kept_float == []
    assert report.first_layers == ['backbone.conv1']
    names = {r.name for r in report.quantized}
    assert any(n.startswith('neck.') for n in names) and any('head' in n for n in names)
    if name.startswith('mask'):
        assert {'roi_head.bbox_head.fc_cls', 'roi_head.mask_head.conv_logits'} <= set(report.last_layers)
        assert any(n.startswith('roi_head.bbox_head.shared_fcs') for n in names)
    elif name.startswith('blendmask'):   # the mask branch ends in the bases and the attentions
        assert {'bbox_head.bottom.conv_bases', 'bbox_head.top_layer'} <= set(report.last_layers)
    else:
        assert all('_cls' in n or '_reg' in n or 'centerness' in n for n in report.last_layers)
    calibrate(model, [batch], forward_fn=tensor_forward)
    with torch.no_grad():
        preds = model.test_step(batch)
        losses = model(**model.data_preprocessor(batch, True), mode='loss')
    assert len(preds) == 1 and 'bboxes' in preds[0].pred_instances
    assert all(torch.isfinite(v).all() for k, v in losses.items() if 'loss' in k and torch.is_tensor(v))
    assert len(quant_layers(model)) == len(report.quantized)


@pytest.mark.parametrize('name', ['resnet50', 'mask-rcnn_fashiondet'])
def test_bitsplit_fits_every_layer_of_stock_models(tmp_path, name):
    """BitSplit on stock mmpretrain / mmdet models: every quantized layer (bottleneck 1x1s, Mask
    R-CNN's RPN, box and mask heads, its transposed-conv upsampler included) is fitted on its own
    outputs, never worse than round-to-nearest."""
    from mmquant.ptq import BitSplitPTQ
    if name in CLASSIFIERS:
        model, batch = build(tmp_path, CLASSIFIERS[name], 'mmpretrain'), cls_batch(size=64)
    else:
        model, batch = build(tmp_path, DETECTORS[name], 'mmdet'), det_batch()
    ptq = BitSplitPTQ(bits='w3a8', num_samples=256, iters=1)
    report = ptq.convert(model, lambda: tensor_forward(model, batch))
    records = ptq.calibrate(model, [batch], forward_fn=tensor_forward)
    fits = {r.name: r.fit for r in records}
    assert set(fits) == {r.name for r in report.quantized}
    assert all(r.err_bitsplit <= r.err_rtn + 1e-6 for r in records)
    if name == 'resnet50':
        assert set(fits.values()) == {'output'}
    else:
        assert {fits[n] for n in ('rpn_head.rpn_conv', 'roi_head.bbox_head.shared_fcs.0',
                                  'roi_head.mask_head.convs.0.conv', 'roi_head.mask_head.upsample')} == {'output'}
    with torch.no_grad():
        assert len(model.test_step(batch)) == len(batch['inputs'])


def test_brecq_reconstructs_every_unit_of_retinanet(tmp_path):
    """BRECQ on RetinaNet: residual blocks, FPN ConvModules and the shared head ConvModules (each
    called once per FPN level) are units; every unit ends no worse than round-to-nearest."""
    from mmquant.ptq import BRECQPTQ
    model, batch = build(tmp_path, DETECTORS['retinanet_fashiondet'], 'mmdet'), det_batch()
    ptq = BRECQPTQ(bits='w4a8', iters=3, batch_size=4)
    ptq.convert(model, lambda: tensor_forward(model, batch))
    records = ptq.calibrate(model, [batch], forward_fn=tensor_forward)
    by = {r.name: r for r in records}
    assert 'neck.fpn_convs.0' in by and 'bbox_head.cls_convs.0' in by and 'backbone.layer1.0' in by
    assert by['bbox_head.cls_convs.0'].samples == 5 * by['neck.fpn_convs.0'].samples      # five levels
    assert sorted(l for r in records for l in r.layers) == sorted(n for n, _ in quant_layers(model))
    assert all(r.loss <= r.loss_rtn * (1 + 1e-6) for r in records if r.loss is not None)
    with torch.no_grad():
        assert len(model.test_step(batch)) == len(batch['inputs'])


@pytest.mark.parametrize('config,method,bits', [('fcos_r18_dorefa_w2a2.py', 'dorefa', 'w2a2'),
                                                ('retinanet_r18_lsq_w4a4.py', 'lsq', 'w4a4')])
def test_detector_qat_configs_build_and_train_a_step(config, method, bits):
    """The ready detector QAT configs: the model builds through QuantizedModel with the method's
    quantizers, the stem and prediction convs at 8 bits, and one training step updates the
    learned quantizer parameters (FPN inputs are signed: their quantizers decide so)."""
    from mmquant.engine.cli import apply_qat
    cfg = apply_qat(Config.fromfile(osp.join(ROOT, 'configs', config)))
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    report = model.mmquant_report
    roles = {r.name: (r.w_bits, r.a_bits, r.role) for r in report.quantized}
    assert roles['backbone.conv1'][:2] == (8, 8) and all(roles[n][:2] == (8, 8) for n in cfg.quant.last_layers)
    w, a = int(bits[1]), int(bits[3])
    assert roles['neck.fpn_convs.0.conv'][:2] == (w, a) and float_convs(model) == []
    batch = det_batch()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    loss, _ = model.parse_losses(model(**model.data_preprocessor(batch, True), mode='loss'))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    fpn_in = model.neck.fpn_convs[0].conv.input_quantizer
    assert bool(fpn_in.calibrated) and bool(fpn_in.signed)   # lateral sums can be negative
    if method == 'lsq':
        assert fpn_in.step.grad is not None and torch.isfinite(fpn_in.step.grad).all()


@pytest.mark.parametrize('fmt', ['qdq', 'int'])
def test_retinanet_exports_head_maps_that_match(tmp_path, fmt):
    """RetinaNet-R18 (our fashion_det recipe, random init), min-max W8A8: the ONNX graph returns
    the 10 head maps (5 levels x cls / reg) of the PyTorch quantized model; the integer graph
    equals the integer simulator bit for bit."""
    import onnx
    import onnxruntime as ort
    from mmquant.engine.ptq_loop import TensorMode, flatten_outputs
    from mmquant.export import IntegerSimulator, export_int, export_qdq
    model = build(tmp_path, DETECTORS['retinanet_fashiondet'], 'mmdet')
    batch = det_batch()
    convert(model, QConfig.build(dict(default=dict(w_per_channel=True)), bits='w8a8'),
            example_forward=lambda: tensor_forward(model, batch))
    calibrate(model, [batch], forward_fn=tensor_forward)
    x = model.data_preprocessor(batch, False)['inputs']
    path = str(tmp_path / f'retinanet_{fmt}.onnx')
    (export_int if fmt == 'int' else export_qdq)(TensorMode(model), x, path)
    outs = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})
    with torch.no_grad():
        ref = flatten_outputs(model(x, mode='tensor'))
        ref64 = flatten_outputs(model.double()(x.double(), mode='tensor'))
    assert len(outs) == len(ref) == 10
    # a randomly initialised RetinaNet at 8 bits puts many values next to a rounding boundary, so
    # float32 rounding moves codes: the graph may differ from PyTorch's float32 fake-quant model by
    # as much as that model differs from itself in float64, no more
    for o, r, r64 in zip(outs, ref, ref64):
        assert o.shape == tuple(r.shape)
        noise = float((r.double() - r64).abs().max())
        assert float(np.abs(o - r.numpy()).max()) <= 2 * noise + 1e-5
    if fmt == 'int':
        for o, s in zip(outs, IntegerSimulator(onnx.load(path))(x)):
            np.testing.assert_array_equal(o, s.numpy())
