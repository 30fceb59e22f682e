"""Layer mapping M: the paper's 6 -> 2 table, the general rule, errors and the CLI."""

from __future__ import annotations

import json
import random

import pytest

from combinekd.cli import main
from combinekd.errors import UserError
from combinekd.mapping import blocks, layer_groups, random_groups

PAPER_6_TO_2 = {
    "skip": [[3], [6]],
    "regular": [[1, 2, 3], [4, 5, 6]],
    "overlap": [[1, 2, 3, 4], [3, 4, 5, 6]],
    "skip-middle": [[1, 2], [5, 6]],
    "cross": [[1, 3], [4, 6]],
}


@pytest.mark.parametrize("strategy, expected", PAPER_6_TO_2.items())
def test_paper_table_6_to_2(strategy, expected):
    assert layer_groups(strategy, 6, 2) == expected


@pytest.mark.parametrize("t, s, expected_blocks", [
    (12, 3, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]),
    (12, 4, [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]),
    (6, 4, [[1], [2, 3], [4], [5, 6]]),
    (7, 3, [[1, 2], [3, 4], [5, 6, 7]]),
])
def test_blocks_are_contiguous_and_near_equal(t, s, expected_blocks):
    assert blocks(t, s) == expected_blocks


GENERAL = {
    (12, 3): {"skip": [[4], [8], [12]], "regular": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
              "overlap": [[1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [8, 9, 10, 11, 12]],
              "skip-middle": [[1, 2, 3], [5, 7, 8], [10, 11, 12]],
              "cross": [[1, 4], [5, 8], [9, 12]]},
    (12, 4): {"skip": [[3], [6], [9], [12]], "overlap": [[1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9, 10],
                                                          [9, 10, 11, 12]],
              "skip-middle": [[1, 2], [4, 5], [8, 9], [11, 12]], "cross": [[1, 3], [4, 6], [7, 9], [10, 12]]},
    (6, 4): {"skip": [[1], [3], [4], [6]], "regular": [[1], [2, 3], [4], [5, 6]],
             "overlap": [[1, 2], [1, 2, 3, 4], [3, 4, 5], [4, 5, 6]],
             "skip-middle": [[1], [2], [4], [6]], "cross": [[1], [2, 3], [4], [5, 6]]},
    (7, 3): {"skip": [[2], [4], [7]], "regular": [[1, 2], [3, 4], [5, 6, 7]],
             "overlap": [[1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]],
             "skip-middle": [[1], [3], [6, 7]], "cross": [[1, 2], [3, 4], [5, 7]]},
}


@pytest.mark.parametrize("t, s, strategy, expected",
                         [(t, s, name, groups) for (t, s), table in GENERAL.items() for name, groups in table.items()])
def test_general_rule(t, s, strategy, expected):
    assert layer_groups(strategy, t, s) == expected


def test_all_and_random():
    assert layer_groups("all", 4, 2) == [[1, 2, 3, 4], [1, 2, 3, 4]]
    rng = random.Random(0)
    draws = [random_groups(12, 3, rng) for _ in range(20)]
    for groups in draws:
        flat = [g[0] for g in groups]
        assert len(groups) == 3 and flat == sorted(set(flat)) and all(1 <= j <= 12 for j in flat)
    assert len({json.dumps(d) for d in draws}) > 1, "a fresh choice per step"


def test_same_depth_skip_is_identity():
    assert layer_groups("skip", 4, 4) == [[1], [2], [3], [4]]


@pytest.mark.parametrize("groups, message", [
    ([[1, 2], [7]], "outside 1..6"),
    ([[1, 2], []], "is empty"),
    ([[1, 2]], "1 groups given for 2 student layers"),
    ([[0], [3]], "outside 1..6"),
])
def test_bad_groups(groups, message):
    with pytest.raises(UserError, match=message):
        layer_groups("groups", 6, 2, groups)


def test_student_deeper_than_teacher_is_an_error():
    with pytest.raises(UserError, match="at least as many teacher layers"):
        layer_groups("regular", 2, 3)


def test_cli_json_and_text(capsys):
    assert main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "overlap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [[1, 2, 3, 4], [3, 4, 5, 6]]
    assert main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "cross"]) == 0
    assert capsys.readouterr().out.strip() == "cross: S1 <- T{1,3}, S2 <- T{4,6}"
    code = main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "groups",
                 "--groups", "[[1,9],[2]]"])
    err = capsys.readouterr().err
    assert code == 2 and "outside 1..6" in err and len(err.strip().splitlines()) == 1


def test_groups_must_hold_layer_numbers(capsys):
    code = main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "groups",
                 "--groups", '[[1,"a"],[2]]'])
    assert code == 2 and "must be a list of layer numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["mapping", "--teacher-layers", "0", "--student-layers", "2", "--strategy", "skip"])
    assert exit_info.value.code == 2
