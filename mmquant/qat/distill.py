"""Knowledge distillation from the float model (torch only).

The loss of Hinton et al. (2015) that Apprentice (Mishra & Marr, ICLR 2018) adds to low-bit
quantization-aware training, the float network being the teacher:

    T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the samples. The ``T^2`` keeps the gradient's magnitude independent of ``T``
(the soft targets' gradients scale as ``1 / T^2``).
"""
import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, the classes on the last
    dimension, averaged over every other position (the batch). The teacher is a constant: no
    gradient reaches ``teacher_logits``. Computed in at least float32 (logits under AMP may be half)."""
    if temperature <= 0:
        raise ValueError(f'distillation temperature={temperature} must be > 0')
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f'student logits {tuple(student_logits.shape)} and teacher logits '
                         f'{tuple(teacher_logits.shape)} differ in shape')
    classes = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)     # float64 stays float64
    s = student_logits.to(dtype).reshape(-1, classes) / temperature
    t = teacher_logits.detach().to(dtype).reshape(-1, classes) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return kl * temperature ** 2


__all__ = ['distill_loss']
