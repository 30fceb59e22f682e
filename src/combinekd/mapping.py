"""Layer mapping M: which teacher layers (1-based, bottom = 1) each student layer learns from.

One rule generalises every named strategy to any teacher depth T >= student depth S. The teacher
stack is cut into S contiguous *blocks* as equal as possible; block i (1-based) holds layers
floor((i-1)T/S)+1 .. floor(iT/S). Then, for student layer i with block B_i:

=============  ===============================================  ===============  ===========
strategy       M(i)                                             paper, 6 -> 2    name
=============  ===============================================  ===============  ===========
skip           the top layer of B_i                             {3} {6}          PKD
regular        B_i                                              {1,2,3} {4,5,6}  RC
overlap        B_i widened by one layer into each neighbour     {1..4} {3..6}    OC
skip-middle    B_i without its layer nearest the teacher's      {1,2} {5,6}      SC
               middle (T+1)/2 (the lower one on a tie)
cross          the bottom and top layers of B_i                 {1,3} {4,6}      CC
all            every teacher layer (for the attention combiner)
groups         the explicit list of lists from the config
random         RAIL-KD: each step, S distinct teacher layers drawn at random, sorted, one each
=============  ===============================================  ===============  ===========

A block of one layer stays as it is under every rule.
"""

from __future__ import annotations

import random as _random

from combinekd.errors import UserError

Groups = list[list[int]]


def blocks(teacher_layers: int, student_layers: int) -> Groups:
    """The S contiguous, near-equal blocks of the T teacher layers."""
    t, s = teacher_layers, student_layers
    return [list(range((i - 1) * t // s + 1, i * t // s + 1)) for i in range(1, s + 1)]


def layer_groups(strategy: str, teacher_layers: int, student_layers: int, groups: Groups | None = None) -> Groups:
    """M(i) for i = 1..S under ``strategy`` (for ``random``: the pool each step draws from)."""
    t, s = teacher_layers, student_layers
    if s < 1 or t < 1:
        raise UserError(f"layer counts must be positive (teacher {t}, student {s})")
    if strategy == "groups":
        return validate_groups(groups or [], t, s)
    if t < s:
        raise UserError(f"strategy `{strategy}` needs at least as many teacher layers ({t}) as student layers ({s})")
    middle = (t + 1) / 2
    result: Groups = []
    for block in blocks(t, s):
        if strategy == "skip":
            group = [block[-1]]
        elif strategy == "regular":
            group = block
        elif strategy == "overlap":
            group = list(range(max(1, block[0] - 1), min(t, block[-1] + 1) + 1))
        elif strategy == "skip-middle":
            nearest = min(block, key=lambda j: (abs(j - middle), j))
            group = [j for j in block if j != nearest] if len(block) > 1 else block
        elif strategy == "cross":
            group = sorted({block[0], block[-1]})
        elif strategy in ("all", "random"):
            group = list(range(1, t + 1))
        else:
            raise UserError(f"unknown mapping strategy `{strategy}`")
        result.append(group)
    return result


def validate_groups(groups: Groups, teacher_layers: int, student_layers: int) -> Groups:
    """Check explicit groups: one non-empty group per student layer, layers within 1..T."""
    if len(groups) != student_layers:
        raise UserError(f"layer groups: {len(groups)} groups given for {student_layers} student layers")
    for i, group in enumerate(groups, 1):
        if not isinstance(group, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in group):
            raise UserError(f"layer groups: the group for student layer {i} must be a list of layer numbers")
        if not group:
            raise UserError(f"layer groups: the group for student layer {i} is empty")
        bad = [j for j in group if not 1 <= j <= teacher_layers]
        if bad:
            raise UserError(f"layer groups: student layer {i} maps to teacher layer(s) {bad}, "
                            f"outside 1..{teacher_layers}")
    return [sorted(set(g)) for g in groups]


def random_groups(teacher_layers: int, student_layers: int, rng: _random.Random) -> Groups:
    """RAIL-KD: S distinct teacher layers drawn afresh, sorted, one per student layer."""
    return [[j] for j in sorted(rng.sample(range(1, teacher_layers + 1), student_layers))]


def describe(strategy: str, groups: Groups, side: str = "") -> str:
    """One readable line, e.g. ``encoder overlap: S1 <- T{1,2,3,4}, S2 <- T{3,4,5,6}``."""
    if strategy == "random":
        return f"{side} random: each step {len(groups)} of teacher layers 1..{len(groups[0])}, one each".strip()
    body = ", ".join(f"S{i} <- T{{{','.join(map(str, g))}}}" for i, g in enumerate(groups, 1))
    return f"{side} {strategy}: {body}".strip()
