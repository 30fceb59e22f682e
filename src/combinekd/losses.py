"""The loss terms of the KD objective, as plain functions. Every term is an average over the
non-padded positions given by ``mask`` (target tokens for the decoder, source tokens for the encoder).

    L = w_hard * CE_ls(student, gold) + w_soft * T^2 * KL(p_T^tau || p_S^tau)
        + w_layer * sum_i LayerLoss(h_S^i, Combine({h_T^j : j in M(i)})) + w_attn * L_attn
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy with the gold targets, per non-pad target token (labels -100 = pad)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Word-level KD (Hinton et al.; Kim & Rush): T^2 * KL(softmax(z_T / T) || softmax(z_S / T))."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return temperature ** 2 * masked_mean(kl, mask)


def layer_loss(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between a student layer and its (combined) teacher target, per position.

    ``mse``: mean squared error over features (the paper); ``normalized-mse``: sum of squared
    differences of the L2-normalised vectors (the authors' code); ``cosine``: 1 - cosine similarity."""
    student, target = student.float(), target.float()
    if kind == "mse":
        per_position = (student - target).pow(2).mean(-1)
    elif kind == "normalized-mse":
        per_position = (F.normalize(student, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(-1)
    elif kind == "cosine":
        per_position = 1 - F.cosine_similarity(student, target, dim=-1)
    else:
        raise ValueError(f"unknown layer loss {kind!r}")
    return masked_mean(per_position, mask)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between head-averaged self-attention maps (batch, heads, query, key), over valid queries."""
    s, t = student_attn.float().mean(1), teacher_attn.float().mean(1)
    return masked_mean((s - t).pow(2).sum(-1), mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (batch, length) over positions where ``mask`` is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
