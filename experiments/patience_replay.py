"""Where early stopping would have stopped runs, replayed on their logged evaluations:

    python experiments/patience_replay.py RUN_DIR [RUN_DIR ...] [--patience 5] [--out results/x.md]

For each run (its train_log.jsonl), under `train.patience_on` = bleu and = bleu-or-loss (the trainer's rule:
a better dev BLEU, or a dev loss trainer.LOSS_IMPROVEMENT below the lowest so far), the update at which the
run would have stopped (or "not within the log": the log ended first) and the best dev BLEU up to there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from combinekd.trainer import LOSS_IMPROVEMENT


def replay(evals: list[dict], patience: int, rule: str) -> tuple[int | None, float, int]:
    """``(stop_step or None, best dev BLEU up to it, its step)`` for one rule."""
    best_bleu, best_step, best_loss, bad = -1.0, 0, None, 0
    for e in evals:
        improved = e["dev_bleu"] > best_bleu
        lower_loss = best_loss is None or e["dev_loss"] < best_loss * (1 - LOSS_IMPROVEMENT)
        best_loss = e["dev_loss"] if best_loss is None else min(best_loss, e["dev_loss"])
        if improved:
            best_bleu, best_step = e["dev_bleu"], e["step"]
        bad = 0 if improved or (lower_loss and rule == "bleu-or-loss") else bad + 1
        if bad >= patience:
            return e["step"], best_bleu, best_step
    return None, best_bleu, best_step


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
        evals = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
                 if '"dev_bleu"' in line]
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
