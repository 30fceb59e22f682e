"""For a run trained before ``train.keep_models`` existed: write the two models it still has, its best
model (output_dir) and its last checkpoint's student (checkpoints/last), as kept models, so that
``combinekd average RUN --out RUN-avg`` averages those two. A crude average (two models, the last one
past the best, usually ``patience`` evaluations later), for a first look at converged runs:

    python experiments/backfill_kept.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, load_model, save_file

from combinekd.average import MODELS, keep_model, kept_models
from combinekd.models import load_model_dir


def backfill(run: Path) -> list[int]:
    if kept_models(run):
        return [step for step, _ in kept_models(run)]
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    last = run / "checkpoints" / "last"
    state = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))["progress"]
    model = load_model_dir(run)[0]
    keep_model(model, run, summary["best_step"], keep=2)  # the best model, as output_dir holds it
    weights = {name.removeprefix("student."): value for name, value in
               load_file(str(last / "objective.safetensors")).items() if name.startswith("student.")}
    with tempfile.TemporaryDirectory() as scratch:  # safetensors' strict loader knows tied weights
        save_file(weights, f"{scratch}/student.safetensors")
        load_model(model, f"{scratch}/student.safetensors")
    keep_model(model, run, state["step"], keep=2)  # the last checkpoint's student
    return [step for step, _ in kept_models(run)]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, backfill(Path(arg)), "->", Path(arg) / MODELS)
