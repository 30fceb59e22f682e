"""Combiners: turn the group of teacher layers {h_T^j : j in M(i)} into one target for h_S^i.

Each combiner returns the pair ``(student, target)`` that the layer loss then compares. One rule
holds for all of them, because the student and any trainable map are optimised together:

    the target is a parameter-free function of the teacher; a trainable map W, where widths or
    group sizes need one, acts on the student side:  LayerLoss(N(W h_S^i), N(C(h_T^{M(i)}))).

N is a per-position layer norm without parameters (zero mean, unit variance over the features;
per teacher layer for a concatenation). A target that W could shape would let the loss be met by
fitting W to whatever the student computes, or by shrinking both (the paper's form,
``MSE(h_S, W [h_T^{j_1}; ...; h_T^{j_k}])`` with W trained jointly, does exactly that: see the
README, "Why the paper's projection collapsed"). With a fixed, normalised target the loss reaches
zero only when the student's states determine the teacher's; a student that has learnt nothing
scores up to 2 under ``mse`` (two unrelated unit-variance vectors), less only by the part of the
target that every position shares (logged as ``baseline``). N also makes post-LN teachers
(normalised states) and pre-LN teachers (a residual stream whose scale grows with depth)
comparable, and lets no teacher layer of a group outweigh the others.

One teacher layer of the student's width needs no map: ``skip`` between equal widths has no
parameters, and a student identical to its teacher has zero loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize(x: torch.Tensor, width: int) -> torch.Tensor:
    """N(x): parameter-free layer norm over each consecutive chunk of ``width`` features."""
    chunks = x.float().unflatten(-1, (-1, width))
    return F.layer_norm(chunks, (width,)).flatten(-2)


def _map(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)


class LinearCombiner(nn.Module):
    """CKD (the paper): concatenate the group, relate it to the student by a trainable linear map.

    target = [N(h_T^{j_1}); ...; N(h_T^{j_k})],   student = N(W h_S^i),   W in R^{k d_T x d_S},
    compared with MSE (the paper's loss). The paper puts W on the teacher side; here it maps the
    student into the concatenation so that the target stays fixed (module docstring)."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.teacher_dim = teacher_dim
        self.project = _map(student_dim, group_size * teacher_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.cat([normalize(h, self.teacher_dim) for h in teachers], dim=-1)
        return normalize(self.project(student), self.teacher_dim), target


class StudentUpCombiner(nn.Module):
    """CKD as in the authors' released code: project the student up to the concatenated group.

    student = W h_S^i, W in R^{k d_T x d_S}; target = [h_T^{j_1}; ...; h_T^{j_k}]; both vectors are
    L2-normalised as a whole by the ``normalized-mse`` layer loss (this combiner's default)."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.project = _map(student_dim, group_size * teacher_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project(student), torch.cat(teachers, dim=-1)


class AttentionCombiner(nn.Module):
    """ALP-KD (Passban et al., 2021): attention over the group's layers, per position.

    q = W h_S^i (W in R^{d_T x d_S}),  alpha_j = softmax_j(<N(q), N(h_T^j)> / sqrt(d_T)),
    target = N(sum_j alpha_j N(h_T^j)),  student = N(q)."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.teacher_dim = teacher_dim
        self.project = _map(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        query = normalize(self.project(student), self.teacher_dim)
        keys = torch.stack([normalize(h, self.teacher_dim) for h in teachers], dim=-2)  # (batch, len, k, d_T)
        scores = (keys @ query.unsqueeze(-1)).squeeze(-1) / self.teacher_dim ** 0.5
        weights = scores.softmax(dim=-1).unsqueeze(-1)
        return query, normalize((weights * keys).sum(dim=-2), self.teacher_dim)


class MeanCombiner(nn.Module):
    """Parameter-free target: the group's average.  target = N(mean_j N(h_T^j)),  student = N(W h_S^i)
    (W only when the widths differ)."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.teacher_dim = teacher_dim
        self.project = _map(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.stack([normalize(h, self.teacher_dim) for h in teachers]).mean(0)
        return normalize(self.project(student), self.teacher_dim), normalize(mean, self.teacher_dim)


COMBINERS: dict[str, type[nn.Module]] = {"linear": LinearCombiner, "student-up": StudentUpCombiner,
                                         "attention": AttentionCombiner, "mean": MeanCombiner}


def build_combiner(name: str, group_size: int, teacher_dim: int, student_dim: int) -> nn.Module:
    return COMBINERS[name](group_size, teacher_dim, student_dim)
