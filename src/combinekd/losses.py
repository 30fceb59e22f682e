"""The loss terms of the KD objective, as plain functions. Every term is an average over the
non-padded positions given by ``mask`` (target tokens for the decoder, source tokens for the encoder).

    L = w_hard * CE_ls(student, gold) + w_soft * T^2 * KL(p_T^tau || p_S^tau)
        + w_layer * sum_i LayerLoss(h_S^i, Combine({h_T^j : j in M(i)})) + w_attn * L_attn
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vocab_losses(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                 label_smoothing: float, temperature: float = 1.0, w_hard: float = 1.0,
                 w_soft: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, hard, soft)`` per non-pad target token (labels -100 = pad), the two terms over the vocabulary:

        hard = CE_ls(z_S, y) = (1 - eps) * -log p_S[y] + eps * mean_v(-log p_S[v])     (label smoothing eps)
        soft = T^2 * KL(q || p_S^T),  q = softmax(z_T / T),  p_S^T = softmax(z_S / T)  (word-level KD)
        loss = w_hard * hard + w_soft * soft

    ``loss`` carries the gradient; ``hard`` and ``soft`` are its parts' values (detached, for the log);
    ``soft`` is 0 without ``teacher_logits``. Logits of any float dtype (bf16 under autocast) are read a
    chunk of rows at a time in fp32. The gradient is written during the forward pass, while each chunk's
    softmaxes are at hand (one exponential per logit and distribution, instead of computing them again
    in the backward pass):
        d hard / dz = p_S - (1 - eps) * onehot(y) - eps / V,     d soft / dz = T * (p_S^T - q),
    so no full-vocabulary tensor is materialised besides the logits and their gradient (the plain
    autograd version keeps several fp32 copies: a 4,096-token batch x 8,000 words is 130 MB each)."""
    vocab = logits.shape[-1]
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    wants_grad = torch.is_grad_enabled() and logits.requires_grad  # (inside forward, grad mode is off)
    return _VocabLosses.apply(logits.reshape(-1, vocab), teacher, labels.reshape(-1), label_smoothing,
                              temperature, w_hard, w_soft if teacher is not None else 0.0, wants_grad)


_CHUNK_ELEMENTS = 1 << 20  # rows x vocabulary per chunk: 4 MB in fp32, stays in the CPU's cache


class _VocabLosses(torch.autograd.Function):
    """Forward: per chunk of rows, the softmaxes p = exp(z - m) / sum exp(z - m) (m = max, for safety),
    the log-partition lse(z) = m + log sum exp(z - m) (one exponential per logit), and from them
        -log p_S[v] = lse(z) - z_v,   KL(q || p_S^T) = sum_v q_v (z_T/T - z/T)_v - lse(z_T/T) + lse(z/T),
    and the gradient of ``loss``. Backward: that gradient times the incoming one."""

    @staticmethod
    def forward(ctx, logits, teacher, labels, eps, temperature, w_hard, w_soft, wants_grad):
        wide = torch.promote_types(logits.dtype, torch.float32)
        vocab = logits.shape[-1]
        valid = labels != -100
        n = max(int(valid.sum()), 1)
        hard = logits.new_zeros((), dtype=torch.float64)
        soft = logits.new_zeros((), dtype=torch.float64)
        grad = torch.empty_like(logits) if wants_grad else None
        step = max(1, _CHUNK_ELEMENTS // vocab)
        for at in range(0, logits.shape[0], step):
            rows = slice(at, at + step)
            z, y = _wide(logits[rows]), labels[rows].clamp(min=0)[:, None]
            scale = valid[rows].to(z.dtype) / n  # per row: 1/n, pad rows 0 (no loss, no gradient)
            e, total, lse = _exp_sum(z)  # p_S = e / total
            hard += ((lse - (1 - eps) * z.gather(1, y).squeeze(1) - eps * z.mean(-1)) * scale).sum()
            if teacher is not None:
                z_t = teacher[rows].to(z.dtype, copy=True)  # changed in place below
                z_t, z_s = (z_t / temperature, z / temperature) if temperature != 1 else (z_t, z)
                e_t, total_t, lse_t = _exp_sum(z_t)  # q = e_t / total_t
                lse_s = lse if temperature == 1 else z_s.logsumexp(-1)
                cross = z_t.sub_(z_s).mul_(e_t).sum(-1) / total_t  # sum_v q_v (z_T/T - z/T)_v
                soft += ((cross - lse_t + lse_s) * scale).sum()
            if grad is None:
                continue
            if teacher is None:
                g = e.mul_((w_hard * scale / total)[:, None])
            else:
                # d loss / dz = w_hard (p_S - (1 - eps) onehot(y) - eps / V) + w_soft T (p_S^T - q)
                g = e.mul_(((w_hard + (w_soft if temperature == 1 else 0.0)) * scale / total)[:, None])
                if temperature != 1:  # p_S^T is not p_S: its own softmax
                    g.add_(z_s.sub_(lse_s[:, None]).exp_().mul_((w_soft * temperature * scale)[:, None]))
                g.sub_(e_t.mul_((w_soft * temperature * scale / total_t)[:, None]))
            g.sub_((w_hard * eps / vocab * scale)[:, None]).scatter_add_(1, y, (-w_hard * (1 - eps) * scale)[:, None])
            grad[rows] = g
        if grad is not None:
            ctx.save_for_backward(grad)
        parts = hard.to(wide), (temperature ** 2 * soft).to(wide)  # hard and soft are sums of rows / n
        ctx.mark_non_differentiable(*parts)
        return (w_hard * hard + w_soft * temperature ** 2 * soft).to(wide), *parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):
        grad, = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def _exp_sum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, total, lse)`` over the last dimension, one exponential per element and safe for any
    logits: e = exp(z - max z), total = sum e (softmax(z) = e / total), lse = logsumexp(z)."""
    m = z.amax(-1, keepdim=True)
    e = (z - m).exp_()
    total = e.sum(-1)
    return e, total, m.squeeze(-1) + total.log()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 for bf16/fp16 (and fp32) inputs, fp64 stays fp64 (for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
