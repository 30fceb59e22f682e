"""Combiners: turn the group of teacher layers {h_T^j : j in M(i)} into one target for h_S^i.

Each combiner returns the pair ``(student, target)`` that the layer loss then compares; both have
the same width. Mapping one teacher layer to a student of the same width needs no projection, so
``skip`` with equal widths has no parameters and a student identical to its teacher has zero loss.
"""

from __future__ import annotations

import torch
from torch import nn


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)


class LinearCombiner(nn.Module):
    """CKD as in the paper: concatenate the group, project linearly to the student width.

    target = W [h_T^{j_1}; ...; h_T^{j_k}],   W in R^{d_S x k d_T}, compared with MSE."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.project = _projection(teacher_dim, student_dim) if group_size == 1 else \
            nn.Linear(group_size * teacher_dim, student_dim, bias=False)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return student, self.project(torch.cat(teachers, dim=-1))


class StudentUpCombiner(nn.Module):
    """CKD as in the authors' released code: project the *student* up to the group's width.

    student' = W h_S^i, W in R^{k d_T x d_S}; target = [h_T^{j_1}; ...; h_T^{j_k}]; both are
    L2-normalised by the ``normalized-mse`` layer loss."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.project = _projection(student_dim, teacher_dim) if group_size == 1 else \
            nn.Linear(student_dim, group_size * teacher_dim, bias=False)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project(student), torch.cat(teachers, dim=-1)


class AttentionCombiner(nn.Module):
    """ALP-KD (Passban et al., 2021): attention over the group's layers, per position.

    alpha_j = softmax_j(<h_S^i, P h_T^j> / sqrt(d_S)),   target = sum_j alpha_j P h_T^j."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.project = _projection(teacher_dim, student_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = self.project(torch.stack(teachers, dim=-2))             # (batch, len, k, d_S)
        scores = (stacked @ student.unsqueeze(-1)).squeeze(-1) / student.shape[-1] ** 0.5
        weights = scores.softmax(dim=-1).unsqueeze(-1)                   # (batch, len, k, 1)
        return student, (weights * stacked).sum(dim=-2)


class MeanCombiner(nn.Module):
    """Parameter-free baseline: the group's average (projected only when widths differ)."""

    def __init__(self, group_size: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.project = _projection(teacher_dim, student_dim)

    def forward(self, student: torch.Tensor, teachers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return student, self.project(torch.stack(teachers, dim=0).mean(dim=0))


COMBINERS: dict[str, type[nn.Module]] = {"linear": LinearCombiner, "student-up": StudentUpCombiner,
                                         "attention": AttentionCombiner, "mean": MeanCombiner}


def build_combiner(name: str, group_size: int, teacher_dim: int, student_dim: int) -> nn.Module:
    return COMBINERS[name](group_size, teacher_dim, student_dim)
