"""Where early stopping would have stopped runs, replayed on their logged evaluations:

    python experiments/patience_replay.py RUN_DIR [RUN_DIR ...] [--patience 5] [--out results/x.md]

For each run (its train_log.jsonl, read as experiments/curves.py reads it), under `train.patience_on` = bleu
and = bleu-or-loss (the trainer's own accounting, `TrainerState.evaluated`), the update at which the run would
have stopped (or "not within the log": the log ended first) and the best dev BLEU up to there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from curves import read_run

from combinekd.trainer import LOSS_IMPROVEMENT, TrainerState


def replay(evals: list[dict], patience: int, rule: str) -> tuple[int | None, float, int]:
    """``(stop_step or None, best dev BLEU up to it, its step)`` for one rule."""
    state = TrainerState()
    for e in evals:
        state.step = e["step"]
        state.evaluated(e["dev_bleu"], e["dev_loss"], rule)
        if state.bad_evals >= patience:
            return state.step, state.best_bleu, state.best_step
    return None, state.best_bleu, state.best_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args()
    lines = [f"patience {args.patience} evaluations; dev loss counts when {LOSS_IMPROVEMENT:.1%} below the lowest",
             "", "| run | evaluations logged | rule | stops at | best dev BLEU (update) up to there |",
             "|---|---:|---|---:|---:|"]
    for run in args.runs:
        evals = read_run(run)["evals"]
        for rule in ("bleu", "bleu-or-loss"):
            stop, bleu, step = replay(evals, args.patience, rule)
            where = f"{stop:,}" if stop else f"not within the log (to {evals[-1]['step']:,})"
            lines.append(f"| {run.name} | {len(evals)} | {rule} | {where} | {bleu:.2f} ({step:,}) |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
