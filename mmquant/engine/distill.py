"""Knowledge distillation from the float model during quantization-aware training.

    quant = dict(method='lsq', bits='w2a2',
                 distill=dict(checkpoint='work_dirs/resnet18_fashionmnist/epoch_8.pth',
                              weight=1.0, temperature=4.0))

``QuantizedModel(distill=...)`` builds the teacher (the same architecture, float, from the same
config dict), loads ``checkpoint`` into it and replaces the classifier's ``loss`` with one that
adds ``loss_kd = weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(:func:`mmquant.qat.distill.distill_loss`) to the task losses; mmengine sums every ``loss*`` key.

The teacher is not a submodule of the student: it is held by the plain object that replaces
``loss``, so the student's ``state_dict``, ``parameters()`` (hence the optimizer and DDP), its
``init_weights`` and ``train()`` / ``eval()`` never see it. It stays in eval mode without
gradients, and moves to the student's device at the first training forward after the student
moved. Distillation only changes the training loss: the checkpoints' ``mmquant_qat`` meta
records the settings for reference, but rebuilding a model from that meta (tools/test.py,
tools/export.py) ignores them and needs no teacher.
"""
import math
import os.path as osp
from typing import Optional

import torch
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import _load_checkpoint
from torch import nn

from ..qat.distill import distill_loss

DISTILL_KEYS = ('checkpoint', 'weight', 'temperature')


def check_distill(distill) -> dict:
    """The validated ``distill`` settings (one-line ``ValueError`` otherwise), defaults filled:
    ``weight`` 1.0, ``temperature`` 1.0. The checkpoint must exist."""
    if not isinstance(distill, dict):
        raise ValueError(f'distill must be a dict(checkpoint=PATH, weight=W, temperature=T), not {distill!r}')
    unknown = sorted(set(distill) - set(DISTILL_KEYS))
    if unknown:
        raise ValueError(f'distill has unknown keys {unknown}; accepted: {", ".join(DISTILL_KEYS)}')
    settings = dict(weight=distill.get('weight', 1.0), temperature=distill.get('temperature', 1.0))
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f'distill {name}={value!r} is out of range: accepted a finite number > 0 '
                             '(weight: the factor of loss_kd; temperature: the softmax temperature T)')
    checkpoint = distill.get('checkpoint')
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError("distill needs checkpoint='PATH': the float model's checkpoint (the teacher)")
    if not osp.isfile(checkpoint):
        raise ValueError(f"distill checkpoint {checkpoint!r} does not exist: it is the float model's "
                         'checkpoint (the teacher), e.g. what the float recipe writes')
    return dict(checkpoint=checkpoint, weight=float(settings['weight']),
                temperature=float(settings['temperature']))


def is_classifier(model) -> bool:
    """mmpretrain ``ImageClassifier``-like: ``extract_feat`` and a ``head`` with ``loss``."""
    head = getattr(model, 'head', None)
    return callable(getattr(model, 'extract_feat', None)) and isinstance(head, nn.Module) \
        and callable(getattr(head, 'loss', None))


def check_classifier(model):
    if not is_classifier(model):
        raise ValueError(f'distillation supports classifiers only (a model with extract_feat and a head, '
                         f'such as mmpretrain ImageClassifier); {type(model).__name__} is not one')


def build_teacher(architecture: dict, checkpoint: str) -> nn.Module:
    """The float ``architecture`` with ``checkpoint``'s weights (every key, every shape), in eval
    mode, without gradients. Loaded through mmengine (under torch >= 2.6 with mmquant's
    allow-list of what OpenMMLab checkpoints hold, set when ``mmquant.engine`` is imported)."""
    teacher = MODELS.build(dict(architecture))
    check_classifier(teacher)
    if not osp.isfile(checkpoint):
        raise ValueError(f"distill checkpoint {checkpoint!r} does not exist: it is the float model's "
                         'checkpoint (the teacher)')
    ckpt = _load_checkpoint(checkpoint, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'distill checkpoint {checkpoint!r} holds no state_dict')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = teacher.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (missing + unexpected + wrong)[0]
        raise ValueError(f'distill checkpoint {checkpoint!r} is not a float checkpoint of this architecture: '
                         f'{len(missing)} keys missing, {len(unexpected)} unexpected, {len(wrong)} of another '
                         f'shape (e.g. {first!r})')
    teacher.load_state_dict(state, strict=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class DistilledLoss:
    """The classifier's ``loss(inputs, data_samples)`` plus ``loss_kd``. A plain object (not an
    ``nn.Module``), so the teacher it holds stays outside the student."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0, temperature: float = 1.0,
                 checkpoint: Optional[str] = None):
        check_classifier(student)
        check_classifier(teacher)
        self.student, self.teacher = student, teacher
        self.weight, self.temperature = float(weight), float(temperature)
        self.checkpoint = checkpoint        # where the teacher's weights came from (for the log)

    def _teacher_on(self, device):
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != device:
            self.teacher.to(device)
        if self.teacher.training:
            self.teacher.eval()
        return self.teacher

    def student_loss(self, inputs, data_samples):
        """The head's losses and the logits its forward produced on the way (one head forward:
        a trained quantizer in the head updates its state once per step, as without distillation)."""
        student = self.student
        feats = student.extract_feat(inputs)
        captured = []
        handle = student.head.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            losses = student.head.loss(feats, data_samples)
        finally:
            handle.remove()
        logits = captured[0] if len(captured) == 1 else student.head(feats)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f'distillation needs the head forward to return logits, '
                             f'{type(student.head).__name__} returned {type(logits).__name__}')
        return losses, logits

    @torch.no_grad()
    def teacher_logits(self, inputs) -> torch.Tensor:
        device = next(self.student.parameters()).device
        teacher = self._teacher_on(device)
        return teacher.head(teacher.extract_feat(inputs))

    def __call__(self, inputs, data_samples) -> dict:
        losses, logits = self.student_loss(inputs, data_samples)
        teacher = self.teacher_logits(inputs)
        losses['loss_kd'] = self.weight * distill_loss(logits, teacher, self.temperature)
        return losses

    def __repr__(self):
        return (f'DistilledLoss(teacher={type(self.teacher).__name__}, weight={self.weight}, '
                f'temperature={self.temperature})')


def attach_distillation(model: nn.Module, teacher: nn.Module, weight: float = 1.0,
                        temperature: float = 1.0, checkpoint: Optional[str] = None) -> nn.Module:
    """Make ``model.loss`` add ``loss_kd`` against ``teacher`` (see :class:`DistilledLoss`)."""
    check_classifier(model)
    # an instance attribute shadowing the class's loss method; not a submodule
    model.loss = DistilledLoss(model, teacher, weight, temperature, checkpoint)
    return model


def distilled(model):
    """The :class:`DistilledLoss` of a model with distillation attached, else ``None``."""
    loss = model.__dict__.get('loss')
    return loss if isinstance(loss, DistilledLoss) else None


__all__ = ['DISTILL_KEYS', 'DistilledLoss', 'attach_distillation', 'build_teacher', 'check_classifier',
           'check_distill', 'distilled', 'is_classifier']
