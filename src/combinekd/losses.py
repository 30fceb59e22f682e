"""The loss terms of the KD objective, as plain functions. Every term is an average over the
non-padded positions given by ``mask`` (target tokens for the decoder, source tokens for the encoder).

    L = w_hard * CE_ls(student, gold) + w_soft * T^2 * KL(p_T^tau || p_S^tau)
        + w_layer * sum_i LayerLoss(h_S^i, Combine({h_T^j : j in M(i)})) + w_attn * L_attn
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vocab_losses(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                 label_smoothing: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hard, soft)`` per non-pad target token (labels -100 = pad), the two terms over the vocabulary:

        hard = CE_ls(z_S, y) = (1 - eps) * -log p_S[y] + eps * mean_v(-log p_S[v])     (label smoothing eps)
        soft = T^2 * KL(q || p_S^T),  q = softmax(z_T / T),  p_S^T = softmax(z_S / T)  (word-level KD)

    ``soft`` is 0 without ``teacher_logits``. Logits of any float dtype (bf16 under autocast) are read
    a chunk of rows at a time in fp32, and the backward pass writes the gradient directly,
        d hard / dz = p_S - (1 - eps) * onehot(y) - eps / V,     d soft / dz = T * (p_S^T - q),
    so no full-vocabulary tensor is materialised besides the logits and their gradient (the plain
    autograd version keeps several fp32 copies: a 4,096-token batch x 8,000 words is 130 MB each)."""
    vocab = logits.shape[-1]
    rows = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    return _VocabLosses.apply(logits.reshape(-1, vocab), teacher, labels.reshape(-1), rows, label_smoothing,
                              temperature)


_CHUNK_ELEMENTS = 1 << 20  # rows x vocabulary per chunk: 4 MB in fp32, stays in the CPU's cache


class _VocabLosses(torch.autograd.Function):
    """Both terms through log-partition functions, lse(z) = log sum_v exp(z_v), so no log-softmax is
    materialised: -log p_S[v] = lse(z) - z_v, and with q = exp(z_T/T - lse(z_T/T)) (sum 1)
    KL(q || p_S^T) = sum_v q_v (z_T/T - z/T)_v - lse(z_T/T) + lse(z/T). The backward pass needs only
    the per-row lse values: p = exp(z - lse(z))."""

    @staticmethod
    def forward(ctx, logits, teacher, labels, rows, eps, temperature):
        wide = torch.promote_types(logits.dtype, torch.float32)
        lse, lse_t, lse_st = (torch.empty(rows.numel(), dtype=wide, device=logits.device) for _ in range(3))
        hard = logits.new_zeros((), dtype=torch.float64)
        soft = logits.new_zeros((), dtype=torch.float64)
        for at, r in _chunks(rows, logits.shape[-1]):
            z, part = _wide(logits[r]), slice(at, at + len(r))
            lse[part] = z.logsumexp(-1)
            hard += (lse[part] - (1 - eps) * z.gather(1, labels[r, None]).squeeze(1) - eps * z.mean(-1)).sum()
            if teacher is not None:
                z_t, z_s = _wide(teacher[r]), z
                if temperature != 1:
                    z_t, z_s = z_t / temperature, z / temperature
                lse_st[part] = lse[part] if temperature == 1 else z_s.logsumexp(-1)
                lse_t[part] = z_t.logsumexp(-1)
                q = (z_t - lse_t[part, None]).exp_()
                soft += ((q * (z_t - z_s)).sum(-1) - lse_t[part] + lse_st[part]).sum()
        ctx.save_for_backward(logits, teacher, labels, rows, lse, lse_t, lse_st)
        ctx.eps, ctx.temperature = eps, temperature
        n = max(rows.numel(), 1)
        return (hard / n).to(wide), (temperature ** 2 * soft / n).to(wide)

    @staticmethod
    def backward(ctx, grad_hard, grad_soft):
        logits, teacher, labels, rows, lse, lse_t, lse_st = ctx.saved_tensors
        eps, temperature = ctx.eps, ctx.temperature
        n, vocab = max(rows.numel(), 1), logits.shape[-1]
        grad = torch.zeros_like(logits)
        for at, r in _chunks(rows, vocab):
            z, part = _wide(logits[r]), slice(at, at + len(r))
            p = (z - lse[part, None]).exp_()  # p_S
            if teacher is None:
                g = p.mul_(grad_hard)
            else:
                z_t = _wide(teacher[r]) if temperature == 1 else _wide(teacher[r]) / temperature
                q = (z_t - lse_t[part, None]).exp_()
                if temperature == 1:  # grad_hard * p_S + grad_soft * (p_S - q)
                    g = p.mul_(grad_hard + grad_soft).sub_(q.mul_(grad_soft))
                else:
                    p_t = (z / temperature - lse_st[part, None]).exp_()
                    g = p.mul_(grad_hard).add_(p_t.sub_(q).mul_(grad_soft * temperature))
            g.sub_(grad_hard * eps / vocab)
            g[torch.arange(len(r), device=g.device), labels[r]] -= grad_hard * (1 - eps)
            grad[r] = g.div_(n).to(grad.dtype)
        return grad, None, None, None, None, None


def _chunks(rows: torch.Tensor, vocab: int):
    """``(offset, row indices)`` of the chunks."""
    step = max(1, _CHUNK_ELEMENTS // vocab)
    return ((i, rows[i:i + step]) for i in range(0, rows.numel(), step))


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
