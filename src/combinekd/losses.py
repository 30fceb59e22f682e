"""The loss terms of the KD objective, as plain functions. Every term is an average over the
non-padded positions given by ``mask`` (target tokens for the decoder, source tokens for the encoder).

    L = w_hard * CE_ls(student, gold) + w_soft * T^2 * KL(p_T^tau || p_S^tau)
        + w_layer * sum_i LayerLoss(h_S^i, Combine({h_T^j : j in M(i)})) + w_attn * L_attn
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from combinekd.errors import warn


@dataclass
class Logits:
    """A model's logits z = h W^T + b, kept as the decoder's last states h and the output layer (W, b)
    so that the loss applies the layer a chunk of rows at a time and no full-vocabulary tensor exists.
    ``weight`` None: ``hidden`` are the logits themselves (models whose output layer is not linear).
    ``dtype``: the precision of the product (bf16 under autocast), as the model's own forward."""

    hidden: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    @property
    def vocab(self) -> int:
        return self.hidden.shape[-1] if self.weight is None else self.weight.shape[0]


def vocab_losses(logits: Logits, teacher_logits: Logits | None, labels: torch.Tensor,
                 label_smoothing: float, temperature: float = 1.0, w_hard: float = 1.0,
                 w_soft: float = 0.0, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, hard, soft)`` per non-pad target token (labels -100 = pad), the two terms over the vocabulary:

        hard = CE_ls(z_S, y) = (1 - eps) * -log p_S[y] + eps * mean_v(-log p_S[v])     (label smoothing eps)
        soft = T^2 * KL(q || p_S^T),  q = softmax(z_T / T),  p_S^T = softmax(z_S / T)  (word-level KD)
        loss = w_hard * hard + w_soft * soft

    ``loss`` carries the gradient (to the student's states and output layer); ``hard`` and ``soft``
    are its parts' values (detached, for the log); ``soft`` is 0 without ``teacher_logits``. Logits
    are formed a chunk of rows at a time and read in fp32. The gradient is written during the forward
    pass, while each chunk's softmaxes are at hand (one exponential per logit and distribution,
    instead of computing them again in the backward pass):
        d hard / dz = p_S - (1 - eps) * onehot(y) - eps / V,     d soft / dz = T * (p_S^T - q),
        d loss / dh = (d loss / dz) W,     d loss / dW = (d loss / dz)^T h,
    so no full-vocabulary tensor is ever materialised (a 4,096-token batch x 8,000 words is 130 MB
    in fp32; the plain autograd version keeps several, and fresh blocks that size cost page faults).
    ``compiled``: each chunk's elementwise work runs as torch.compile's fused loops (``train.compile_loss``)."""
    if teacher_logits is not None and teacher_logits.vocab != logits.vocab:
        raise ValueError(f"teacher predicts {teacher_logits.vocab} tokens, the student {logits.vocab}")
    def rows(x: torch.Tensor | None) -> torch.Tensor | None:  # (batch, length, features) -> (tokens, features)
        return None if x is None else x.reshape(-1, x.shape[-1])

    teacher = teacher_logits or Logits(None)
    grad_enabled = torch.is_grad_enabled()  # (inside forward, grad mode is off)
    wants = tuple(grad_enabled and x is not None and x.requires_grad for x in (logits.hidden, logits.weight))
    return _VocabLosses.apply(rows(logits.hidden), logits.weight, logits.bias, logits.dtype, rows(teacher.hidden),
                              teacher.weight, teacher.bias, teacher.dtype, labels.reshape(-1), label_smoothing,
                              temperature, w_hard, w_soft if teacher_logits is not None else 0.0, wants, compiled)


# rows x vocabulary per chunk of logits: 4 MB in fp32, stays in the CPU's cache (131 to 1,048 rows of
# 8,000 words: the same speed within noise for CE + KL with both output layers, 4,096 x 256 states)
_CHUNK_ELEMENTS = 1 << 20
# chunks per product for the gradients: each product's output (d loss / dW, vocabulary x d) is added to the
# fp32 sum in one more pass, so fewer, taller products cost less (8 chunks of 131 rows x 8,000 words: 17 MB of
# bf16 gradient rows held at a time; 127-146 ms -> 111-124 ms for the loss of 4,096 x 256 states, compiled)
_CHUNKS_PER_PRODUCT = 8


def _chunk_logits(hidden, weight, bias, dtype, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, h): one chunk's logits in fp32 (h W^T in ``dtype``, as the model computes it, then + b; fp64 stays
    fp64, for gradcheck) and the states they came from (in ``dtype``); without an output layer the rows of
    the logits themselves, read in fp32 (a view where they are fp32 already)."""
    if weight is None:
        return _wide(hidden[rows]), hidden[rows]
    h = hidden[rows].to(dtype or hidden.dtype)
    z = _wide(F.linear(h, weight))
    return (z if bias is None else z.add_(bias.reshape(-1))), h


class _VocabLosses(torch.autograd.Function):
    """Forward: per chunk of rows, the terms and the gradient of ``loss`` (``chunk_terms``); backward:
    that gradient times the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, dtype, t_hidden, t_weight, t_bias, t_dtype, labels, eps, temperature,
                w_hard, w_soft, wants, compiled):
        with torch.autocast(hidden.device.type, enabled=False):
            return _VocabLosses._forward(ctx, hidden, weight, bias, dtype, t_hidden, t_weight, t_bias, t_dtype,
                                         labels, eps, temperature, w_hard, w_soft, wants, compiled)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, dtype, t_hidden, t_weight, t_bias, t_dtype, labels, eps, temperature,
                 w_hard, w_soft, wants, compiled):
        wide = torch.promote_types(hidden.dtype, torch.float32)
        if weight is not None:  # the output layers in the product's precision, once
            weight = weight.to(dtype or weight.dtype)
        if t_weight is not None:
            t_weight = t_weight.to(t_dtype or t_weight.dtype)
        vocab = hidden.shape[-1] if weight is None else weight.shape[0]
        valid = labels != -100
        n = max(int(valid.sum()), 1)
        hard = hidden.new_zeros((), dtype=torch.float64)
        soft = hidden.new_zeros((), dtype=torch.float64)
        grad_h = torch.empty_like(hidden) if wants[0] else None
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if wants[1] else None
        step = max(1, _CHUNK_ELEMENTS // vocab)
        group = step * _CHUNKS_PER_PRODUCT
        for start in range(0, hidden.shape[0], group):
            gs = []
            for at in range(start, min(start + group, hidden.shape[0]), step):
                rows = slice(at, at + step)
                z, h = _chunk_logits(hidden, weight, bias, dtype, rows)
                z_t = None
                if t_hidden is not None:
                    z_t = _chunk_logits(t_hidden, t_weight, t_bias, t_dtype, rows)[0].to(z.dtype)
                scale = valid[rows].to(z.dtype) / n  # per row: 1/n, pad rows 0 (no loss, no gradient)
                args = (z, z_t, labels[rows].clamp(min=0), scale, eps, temperature, w_hard, w_soft,
                        grad_h is not None or grad_w is not None, h.dtype)
                chunk_hard, chunk_soft, g = maybe_compiled(chunk_terms, compiled, *args)
                hard += chunk_hard
                soft += chunk_soft
                if g is not None:
                    gs.append(g)
            if not gs:
                continue
            rows = slice(start, start + group)
            g = gs[0] if len(gs) == 1 else torch.cat(gs)
            if weight is None:
                grad_h[rows] = g
                continue
            if grad_h is not None:
                grad_h[rows] = g @ weight  # d loss / dh = g W
            if grad_w is not None:
                grad_w += g.T @ hidden[rows].to(g.dtype)  # d loss / dW = g^T h, summed over the groups in fp32
        ctx.save_for_backward(grad_h, grad_w)
        parts = hard.to(wide), (temperature ** 2 * soft).to(wide)  # hard and soft are sums of rows / n
        ctx.mark_non_differentiable(*parts)
        return (w_hard * hard + w_soft * temperature ** 2 * soft).to(wide), *parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_hard, _grad_soft):
        grad_h, grad_w = ctx.saved_tensors
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w)]
        return grads[0], grads[1], *[None] * 13


def chunk_terms(z: torch.Tensor, z_t: torch.Tensor | None, labels: torch.Tensor, scale: torch.Tensor, eps: float,
                temperature: float, w_hard: float, w_soft: float, grad: bool, grad_dtype: torch.dtype):
    """One chunk of rows of ``vocab_losses``: ``(hard, soft, g)``, the rows' hard and soft terms summed with
    the weights ``scale`` (1/n, pad rows 0), and g = d loss / dz in ``grad_dtype`` (None without ``grad``).
    ``z``, ``z_t``: the student's and the teacher's (or None) logits in fp32, left as they are (under
    torch.compile a changed input is written back: a pass more over the chunk).
    The softmaxes p = exp(z - m) / sum exp(z - m) (m = max, for safety) and the log-partition
    lse(z) = m + log sum exp(z - m), one exponential per logit and distribution, give
        -log p_S[v] = lse(z) - z_v,   KL(q || p_S^T) = sum_v q_v (z_T/T - z/T)_v - lse(z_T/T) + lse(z/T),
        d hard / dz = p_S - (1 - eps) onehot(y) - eps / V,   d soft / dz = T (p_S^T - q).
    A function of tensors: ``vocab_losses`` runs it as it is, or compiled (fused loops instead of one pass
    over the chunk per operation)."""
    vocab = z.shape[-1]
    y = labels[:, None]
    e, total, lse = _exp_sum(z)  # p_S = e / total
    hard = ((lse - (1 - eps) * z.gather(1, y).squeeze(1) - eps * z.mean(-1)) * scale).sum()
    soft = torch.zeros_like(hard)
    if z_t is not None:
        z_t, z_s = (z_t / temperature, z / temperature) if temperature != 1 else (z_t, z)
        e_t, total_t, lse_t = _exp_sum(z_t)  # q = e_t / total_t
        lse_s = lse if temperature == 1 else z_s.logsumexp(-1)
        cross = (z_t - z_s).mul_(e_t).sum(-1) / total_t  # sum_v q_v (z_T/T - z/T)_v
        soft = ((cross - lse_t + lse_s) * scale).sum()
    if not grad:
        return hard, soft, None
    if z_t is None:
        g = e.mul_((w_hard * scale / total)[:, None])
    else:
        # d loss / dz = w_hard (p_S - (1 - eps) onehot(y) - eps / V) + w_soft T (p_S^T - q)
        g = e.mul_(((w_hard + (w_soft if temperature == 1 else 0.0)) * scale / total)[:, None])
        if temperature != 1:  # p_S^T is not p_S: its own softmax
            g.add_(z_s.sub_(lse_s[:, None]).exp_().mul_((w_soft * temperature * scale)[:, None]))
        g.addcmul_(e_t, (w_soft * temperature * scale / total_t)[:, None], value=-1)
    g.sub_((w_hard * eps / vocab * scale)[:, None]).scatter_add_(1, y, (-w_hard * (1 - eps) * scale)[:, None])
    return hard, soft, g.to(grad_dtype)


_compiled: dict = {}  # fn -> torch.compile(fn), built on first use
_eager_only = False  # set once torch.compile could not build here


def maybe_compiled(fn, compiled: bool, *args):
    """``fn(*args)``, through ``torch.compile(fn, dynamic=True)`` (built once per process, for any shapes)
    where ``compiled`` (``train.compile_loss``). Where inductor cannot build (no C++ compiler, ...): one
    warning, and every such function runs eagerly from then on."""
    global _eager_only
    if not compiled or _eager_only:
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[fn](*args)
    except Exception as exc:
        _eager_only = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warn(f"train.compile_loss: torch.compile could not build the loss here ({first}); it runs uncompiled")
        return fn(*args)


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
