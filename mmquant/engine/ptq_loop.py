"""``PTQLoop``: a ``TestLoop`` that quantizes the model before it evaluates it.

    test_cfg = dict(type='PTQLoop', method='minmax', bits='w4a8', calib_images=1024)

Arguments not given are read from the config's ``quant`` dict, which the schemes in
``configs/_base_/quant/`` set (a separate key, so a scheme never collides with the ``test_cfg``
of an mmdet / mmpretrain base config):

    _base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py', '<mmquant>/configs/_base_/quant/minmax_w4a8.py']
    custom_imports = dict(imports=['mmquant'])
    test_cfg = dict(type='PTQLoop')

Order of work: convert the model (unless it already is), restore calibrated quantizers from the
loaded checkpoint if it holds them, otherwise calibrate on ``calib_images`` images and save the
quantized checkpoint (meta records method, qconfig and the input/output layers, so
``tools/test.py CONFIG THAT.pth`` evaluates it again without recalibrating); then evaluate with
the config's evaluator.
"""
import contextlib
import copy
import logging
import os
import os.path as osp
import time
from typing import Optional, Sequence

import torch
from mmengine.dist import broadcast, get_world_size, is_main_process
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner import TestLoop
from mmengine.runner.checkpoint import _load_checkpoint, weights_to_cpu

from ..calibrate import all_calibrated
from ..convert import all_quantizers, quant_layers
from ..ptq import build_ptq
from ..ptq.mixed_precision import set_weight_bits, weight_bits
from .progress import Progress


class _ToRunnerLog(logging.Handler):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def emit(self, record):
        self.target.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def forward_logs(target):
    """Within the block, what the torch-only code logs to ``logging.getLogger('mmquant')`` (e.g.
    per-layer errors) goes to the runner's log instead."""
    log = logging.getLogger('mmquant')
    handler, propagate, level = _ToRunnerLog(target), log.propagate, log.level
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        log.setLevel(level)


def unwrap(model):
    """The model inside a DDP / FSDP wrapper (or the model itself)."""
    return model.module if is_model_wrapper(model) else model


def tensor_forward(model, data):
    """The calibration forward pass: data preprocessor, then the ``tensor`` mode (backbone, neck
    and heads, the RoI heads of two-stage detectors included; no post-processing)."""
    data = model.data_preprocessor(data, False)
    return model(**data, mode='tensor')


class TensorMode(torch.nn.Module):
    """An OpenMMLab model as a plain module from preprocessed inputs to its ``tensor``-mode outputs
    (what ONNX export traces)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return flatten_outputs(self.model(x, mode='tensor'))


def flatten_outputs(out):
    """A model's nested tuple / list outputs (a detector's per-level maps) as one flat tuple; a
    single tensor stays a tensor."""
    if torch.is_tensor(out):
        return out
    flat = []
    for o in out:
        f = flatten_outputs(o)
        flat.extend([f] if torch.is_tensor(f) else f)
    return tuple(flat)


def task_loss(model, data):
    """The training loss of a batch (data preprocessor in training mode, then the ``loss`` mode,
    summed as the model's ``parse_losses`` sums it): what brecq's Fisher loss differentiates."""
    data = model.data_preprocessor(data, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    return loss


def mm_method_options(method: str, model, options: dict) -> dict:
    """A method's options with what some OpenMMLab models need added (where the user did not
    set it): ``brecq`` on a two-stage detector reconstructs the RoI heads against the float RoI
    head on the same proposals (``local_targets=['roi_head']``), since a quantized RPN proposes
    other boxes than the float one."""
    options = dict(options)
    if method == 'brecq' and 'local_targets' not in options and getattr(model, 'with_roi_head', False):
        options['local_targets'] = ['roi_head']
    return options


def default_calib_dataloader(runner, test_dataloader: dict):
    """The runner's train dataloader with the test pipeline (no augmentation), shuffled, so
    calibration sees training images as the model will see test images."""
    train = getattr(runner, '_train_dataloader', None)
    if not isinstance(train, dict):
        return None
    cfg = copy.deepcopy(train)
    test_pipeline = test_dataloader.get('dataset', {}).get('pipeline')
    if test_pipeline is not None and 'pipeline' in cfg.get('dataset', {}):
        cfg['dataset']['pipeline'] = copy.deepcopy(test_pipeline)
    cfg['persistent_workers'] = False
    cfg['sampler'] = dict(type='DefaultSampler', shuffle=True)
    cfg.pop('batch_sampler', None)
    return cfg


def _take_images(dataloader, n: int):
    """Batches from ``dataloader`` holding exactly ``n`` images (fewer if the set is smaller)."""
    out, seen = [], 0
    for data in dataloader:
        k = len(data['inputs'])
        if seen + k > n:
            keep = n - seen
            data = {key: (v[:keep] if isinstance(v, (list, tuple, torch.Tensor)) else v)
                    for key, v in data.items()}
            k = keep
        out.append(data)
        seen += k
        if seen >= n:
            break
    return out, seen


@LOOPS.register_module()
class PTQLoop(TestLoop):

    def __init__(self, runner, dataloader, evaluator, method: Optional[str] = None, bits: Optional[str] = None,
                 qconfig: Optional[dict] = None, calib_dataloader=None, calib_images: Optional[int] = None,
                 first_layers: Optional[Sequence[str]] = None, last_layers: Optional[Sequence[str]] = None,
                 options: Optional[dict] = None, save_checkpoint: bool = True, fp16: bool = False):
        scheme = dict(runner.cfg.get('quant') or {})   # a configs/_base_/quant/*.py scheme
        unknown = set(scheme) - {'method', 'bits', 'qconfig', 'calib_images', 'options'}
        if unknown:
            raise ValueError(f'unknown keys {sorted(unknown)} in the config\'s quant scheme; '
                             'accepted: method, bits, qconfig, calib_images, options')
        method = method or scheme.get('method', 'minmax')
        bits = bits or scheme.get('bits')
        qconfig = qconfig if qconfig is not None else scheme.get('qconfig')
        calib_images = calib_images or scheme.get('calib_images')
        options = options if options is not None else scheme.get('options') or {}
        options = mm_method_options(method, unwrap(runner.model), options)
        self.method = build_ptq(method, qconfig, bits, **options)
        if calib_dataloader is None and isinstance(dataloader, dict):
            calib_dataloader = default_calib_dataloader(runner, dataloader)
        if calib_images is None:
            calib_images = 64 if runner.cfg.get('default_scope') == 'mmdet' else 1024
        if calib_images < 1:
            raise ValueError(f'calib_images={calib_images} must be >= 1')
        super().__init__(runner, dataloader, evaluator, fp16)
        self.calib_dataloader_cfg = calib_dataloader
        self.calib_images = calib_images
        self.io_layers = None if first_layers is None and last_layers is None else (
            set(first_layers or ()), set(last_layers or ()))
        self.save_checkpoint = save_checkpoint
        self.report = None

    @property
    def tag(self) -> str:
        return f'{self.method.name}_{self.method.qconfig.bits_tag()}'

    def run(self):
        self.prepare()
        return super().run()

    def prepare(self):
        """Convert the model, then restore its quantizers from the loaded checkpoint or calibrate
        them (and save the quantized checkpoint): everything but the evaluation."""
        model = unwrap(self.runner.model)
        logger = self.runner.logger
        if not quant_layers(model):
            example = next(iter(self.dataloader))
            self.report = self.method.convert(model, example_forward=lambda: tensor_forward(model, example),
                                              io_layers=self.io_layers)
            logger.info(self.report.format())
        if not self._restore(model) and not all_calibrated(model):
            self._calibrate(model)
        return model

    def _restore(self, model) -> bool:
        """Load calibrated quantizers from the runner's checkpoint, if it has them."""
        path = getattr(self.runner, '_load_from', None)
        if not path:
            return False
        ckpt = _load_checkpoint(path, map_location='cpu')
        state = ckpt.get('state_dict', ckpt)
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        if not any('_quantizer.' in k for k in state):
            return False
        chosen = (ckpt.get('meta') or {}).get('mmquant', {}).get('weight_bits')
        if chosen:                                             # a mixed-precision result
            for name, layer in quant_layers(model):
                if name in chosen:
                    set_weight_bits(layer, int(chosen[name]))
        own = model.state_dict()
        missing = [k for k in own if '_quantizer.' in k and k not in state]
        if missing:
            raise ValueError(f'{path} holds quantizers for another layer set: {len(missing)} missing, '
                             f'e.g. {missing[0]!r}; quantize again from the float checkpoint')
        for name, layer in quant_layers(model):        # biases a method added (bias correction)
            if layer.bias is None and f'{name}.bias' in state:
                layer.bias = torch.nn.Parameter(torch.zeros_like(state[f'{name}.bias']))
        model.load_state_dict(state, strict=False)
        self.runner.logger.info(f'mmquant: restored calibrated quantizers from {path}; no calibration')
        return True

    def _calibrate(self, model):
        if self.calib_dataloader_cfg is None:
            raise ValueError('PTQLoop needs calib_dataloader: the config has no train_dataloader to '
                             'take calibration images from')
        loader = self.runner.build_dataloader(self.calib_dataloader_cfg, seed=self.runner.seed)
        t0 = time.perf_counter()
        batches, n = _take_images(loader, self.calib_images)
        progress = Progress(len(batches), f'calibrating {self.tag} on {n} images', self.runner.logger)
        with forward_logs(self.runner.logger):
            self.method.calibrate(model, batches, forward_fn=tensor_forward, progress=progress,
                                  loss_fn=task_loss)
        progress.close()
        self._sync_ranks(model)
        seconds = time.perf_counter() - t0
        self.runner.logger.info(f'mmquant: {self.tag} calibrated on {n} images in {seconds:.1f} s')
        self.calib_seconds = seconds
        if self.save_checkpoint and is_main_process():
            self._save(model)

    @staticmethod
    def _sync_ranks(model):
        """Under a distributed launcher each rank calibrates on its shard of the calibration
        images; rank 0's quantizer parameters are then given to every rank so they agree."""
        if get_world_size() < 2:
            return
        for q in all_quantizers(model):
            for buf in q.buffers():
                broadcast(buf, src=0)

    def _save(self, model):
        report = self.report
        meta = dict(mmquant=dict(
            method=self.method.name, bits=self.method.qconfig.bits_tag(),
            qconfig=self.method.qconfig.to_dict(), fold_bn=bool(self.method.fold_bn),
            quant_residual=bool(self.method.quant_residual),
            first_layers=report.first_layers if report else None,
            last_layers=report.last_layers if report else None))
        if getattr(self.method, 'mixed_bits', None):      # the searched bits, to rebuild the grids on load
            meta['mmquant']['weight_bits'] = weight_bits(model)
        dataset_meta = getattr(self.dataloader.dataset, 'metainfo', None)
        if dataset_meta is not None:
            meta['dataset_meta'] = dict(dataset_meta)
        path = osp.join(self.runner.work_dir, f'{self.tag}.pth')
        tmp = path + '.tmp'
        torch.save(dict(meta=meta, state_dict=weights_to_cpu(model.state_dict())), tmp)
        os.replace(tmp, path)
        self.runner.logger.info(f'mmquant: quantized checkpoint saved to {path}')
        self.checkpoint_path = path
