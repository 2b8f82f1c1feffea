"""Export a quantized checkpoint of this project to ONNX and check it in onnxruntime.

    python tools/export.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/minmax_w8a8.pth \\
        --format qdq --out resnet18_w8a8.onnx --check-images 10000

    python tools/export.py configs/resnet18_fashionmnist.py work_dirs/resnet18_fashionmnist/minmax_w8a8.pth \\
        --format int --out resnet18_w8a8_int.onnx --check-images 10000

The checkpoint is one that ``tools/test.py --quant ...`` (post-training) or a QAT run wrote; its
meta says how to rebuild the quantized model. The ONNX model takes the data preprocessor's output
(normalised images, NCHW float, any batch size) and returns the head's tensor outputs (a
classifier's logits; a detector's head maps, with box decoding and NMS left to the caller).
``--check-images N`` runs N test images through onnxruntime and the PyTorch fake-quant model and
reports the largest output difference and both top-1 accuracies; for ``int`` it also runs the
PyTorch integer simulator and counts the images whose onnxruntime output differs from it in any bit.

Formats: ``qdq`` (QuantizeLinear / DequantizeLinear around every quantized tensor; lower bit
widths through Clip) and ``int`` (integer-only: ConvInteger / MatMulInteger, int32 biases,
integer multiplier-and-shift requantisation, residual adds and pooling on integers; float only
in the input QuantizeLinear and the output DequantizeLinear).
"""
import argparse
import os
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # mmengine's import
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmquant  # noqa: E402,F401
from mmquant.convert import quant_layers  # noqa: E402
from mmquant.engine.cli import (apply_qat, check_file, fail, load_config, ptq_test_cfg,  # noqa: E402
                                quant_from_qat_meta, quant_meta)
from mmquant.engine.ptq_loop import TensorMode, flatten_outputs, unwrap  # noqa: E402
from mmquant.export import IntegerSimulator, QDQExportError, export_int, export_qdq, multiplier_census  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint', help='a quantized checkpoint (tools/test.py --quant ..., or a QAT run)')
    p.add_argument('--format', choices=['qdq', 'int'], default='qdq')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--qdq-weights', choices=['int8', 'uint8'], default='int8',
                   help='qdq: storage type of the weights; uint8 (zero point + 128) makes onnxruntime use '
                        'u8 x u8 kernels, which do not saturate on x86 CPUs without VNNI')
    p.add_argument('--check-images', type=int, default=256, metavar='N',
                   help='test images to compare onnxruntime with PyTorch on (0: no check)')
    p.add_argument('--work-dir', default=None)
    p.add_argument('--cfg-options', nargs='+', default=None)
    p.add_argument('--launcher', default='none')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    p.add_argument('--quant', default=None, help=argparse.SUPPRESS)
    p.add_argument('--quant-bits', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quantized_model(cfg, checkpoint):
    """The quantized model a checkpoint describes, with its quantizers restored."""
    qat = quant_meta(checkpoint, 'mmquant_qat')
    ptq = quant_meta(checkpoint)
    if qat is None and ptq is None:
        fail(f'{checkpoint} is a float checkpoint: quantize it first (tools/test.py CONFIG CKPT --quant '
             'METHOD --quant-bits wNaM writes a quantized one) or train with a QAT method')
    cfg.load_from = checkpoint
    if qat is not None:
        cfg.quant = quant_from_qat_meta(qat)
        apply_qat(cfg)
        runner = Runner.from_cfg(cfg)
        runner.load_or_resume()
    else:
        cfg.test_cfg = ptq_test_cfg(cfg, argparse.Namespace(checkpoint=checkpoint))
        runner = Runner.from_cfg(cfg)
        runner.load_or_resume()
        runner.test_loop.prepare()
    return unwrap(runner.model).eval(), runner


def check(model, runner, path, n_images, simulate=False):
    """Over ``n_images`` test images: the largest |onnxruntime - PyTorch| over every output, both
    top-1s (classifiers), and (with ``simulate``) the images on which onnxruntime and the integer
    simulator differ in any output bit."""
    import onnx
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    sim = IntegerSimulator(onnx.load(path)) if simulate else None
    seen, diff, right_ort, right_pt, mismatched, classified = 0, 0.0, 0, 0, 0, False
    for data in runner.test_dataloader:
        data = model.data_preprocessor(data, False)
        x = data['inputs'][:n_images - seen]
        with torch.no_grad():
            ref = flatten_outputs(model(x, mode='tensor'))
        ref = [ref] if torch.is_tensor(ref) else list(ref)
        out = session.run(None, {'input': x.numpy()})
        diff = max([diff] + [float(np.abs(o - r.numpy()).max()) for o, r in zip(out, ref)])
        if sim is not None:
            s = sim(x)
            s = [s] if torch.is_tensor(s) else s
            differs = np.zeros(len(x), bool)
            for o, t in zip(out, s):
                differs |= (t.numpy().reshape(len(x), -1) != o.reshape(len(x), -1)).any(1)
            mismatched += int(differs.sum())
        samples = data['data_samples'][:len(x)]
        if len(out) == 1 and out[0].ndim == 2 and 'gt_label' in samples[0]:
            labels, classified = np.array([int(s.gt_label) for s in samples]), True
            right_ort += int((out[0].argmax(1) == labels).sum())
            right_pt += int((ref[0].numpy().argmax(1) == labels).sum())
        seen += len(x)
        if seen >= n_images:
            break
    if not classified:
        return seen, diff, None, None, mismatched
    return seen, diff, 100.0 * right_ort / seen, 100.0 * right_pt / seen, mismatched


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    check_file(args.checkpoint, 'checkpoint')
    out_dir = osp.dirname(osp.abspath(args.out))
    if not osp.isdir(out_dir):
        fail(f'--out directory {out_dir!r} does not exist')
    model, runner = quantized_model(cfg, args.checkpoint)
    if not quant_layers(model):
        fail(f'{args.checkpoint} rebuilt no quantized layers')
    example = model.data_preprocessor(next(iter(runner.test_dataloader)), False)['inputs'][:1]
    try:
        if args.format == 'int':
            export_int(TensorMode(model), example, args.out, opset=args.opset)
        else:
            export_qdq(TensorMode(model), example, args.out, opset=args.opset, weight_dtype=args.qdq_weights)
    except QDQExportError as e:
        fail(str(e))
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, format {args.format})')
    result = dict(out=args.out)
    if args.format == 'int':
        n, k = multiplier_census(onnx.load(args.out))
        print(f'requantisation: {n} integer multipliers, {k} of them powers of two (shifts only)')
        result.update(multipliers=n, power_of_two_multipliers=k)
    if args.check_images > 0:
        n, diff, top1_ort, top1_pt, mismatched = check(model, runner, args.out, args.check_images,
                                                       simulate=args.format == 'int')
        top1 = '' if top1_ort is None else f', top-1 {top1_ort:.2f} (onnxruntime) vs {top1_pt:.2f} (PyTorch fake-quant)'
        print(f'onnxruntime vs PyTorch on {n} test images: max |diff| {diff:.3g} over all outputs{top1}')
        if args.format == 'int':
            print(f'onnxruntime vs the PyTorch integer simulator: {n - mismatched} of {n} images bit-identical')
        result.update(images=n, max_diff=diff, top1_onnx=top1_ort, top1_torch=top1_pt,
                      sim_mismatched=mismatched if args.format == 'int' else None)
    return result


if __name__ == '__main__':
    main()
