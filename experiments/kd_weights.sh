#!/usr/bin/env bash
# KD weights chosen on dev (issue 6, item 4): the CKD student of configs/student-cpu.yaml trained for
# UPDATES updates (default 1,500) with each weighting, from the same converged teacher; prints the dev
# BLEU curve of each (test sets are not looked at) and picks one. One run at a time (2 cores); resumable.
#
#   bash experiments/kd_weights.sh TEACHER_DIR DATA_DIR RUNS_DIR [UPDATES]
#   e.g. bash experiments/kd_weights.sh ~/runs/h2h/teacher ~/runs/h2h/data ~/runs/kdw
# SET="key=value ...": extra --set for every run (e.g. SET="model.d_model=192 model.ffn_dim=768");
# NAMES="paper soft-heavy": only those weightings (default: all four). The learning-rate schedule does
# not depend on train.max_steps, so the first UPDATES updates of a full run with the same config and
# seed are the same run: a converged `combinekd` student's dev curve can stand in for its row
# (REFERENCE="combinekd=RUN_DIR"). Writes RUNS/summary.md (dev BLEU at every evaluation, dev loss at the last)
# and RUNS/summary.json (the rows, the chosen weighting and its weights as --set arguments, which
# experiments/h2h_queue.sh passes to its students).
set -euo pipefail
teacher=${1:?teacher dir}; data=${2:?data dir}; runs=${3:?runs dir}; updates=${4:-1500}
here="$(cd "$(dirname "$0")/.." && pwd)"
ckd="${CKD:-$here/.venv/bin/combinekd}"
mkdir -p "$runs"
declare -A weights=(
    [combinekd]="distill.weights=combinekd"                                   # 0.5 / 0.5 / 1.0 (default until 2026-12-05)
    [paper]="distill.weights=paper"                                           # 0.1 / 0.2 / 0.7 (default since)
    [soft-heavy]="distill.w_hard=0.2 distill.w_soft=0.8 distill.w_layer=1.0"
    [layer-light]="distill.w_hard=0.5 distill.w_soft=0.5 distill.w_layer=0.1"
)
names=(${NAMES:-combinekd paper soft-heavy layer-light})
for name in "${names[@]}"; do
    out="$runs/$name"
    [ -f "$out/train_summary.json" ] && { echo "$name: finished"; continue; }
    sets=(--set "data_dir=$data" --set "output_dir=$out" --set "distill.teacher=$teacher" --set "train.max_steps=$updates"
          --set "train.patience=0")
    for kv in ${weights[$name]} ${SET:-}; do sets+=(--set "$kv"); done
    resume=(); [ -d "$out/checkpoints/last" ] && resume=(--resume)
    echo "$name: training ($(date))"
    "$ckd" train "$here/configs/student-cpu.yaml" "${sets[@]}" "${resume[@]}" > "$runs/$name.log" 2>&1
done
# the dev curves, and RUNS/summary.md: REFERENCE="combinekd=RUN_DIR" adds a longer run of the same config
# and seed cut at UPDATES (e.g. the converged d192 CKD student for the `combinekd` row)
curves=(); for name in "${names[@]}"; do curves+=("$name=$runs/$name"); done
[ -n "${REFERENCE:-}" ] && curves=("$REFERENCE" "${curves[@]}")
"${PY:-$here/.venv/bin/python}" - "$runs/summary.md" "$updates" "${curves[@]}" <<'PY'
import json, sys
from pathlib import Path
import yaml
out, updates, rows = Path(sys.argv[1]), int(sys.argv[2]), []
keys = ("w_hard", "w_soft", "w_layer")
for arg in sys.argv[3:]:
    name, run = arg.split("=", 1)
    evals = [e for e in map(json.loads, open(Path(run) / "train_log.jsonl")) if "dev_bleu" in e and e["step"] <= updates]
    distill = yaml.safe_load((Path(run) / "train_config.yaml").read_text())["distill"]  # weights resolved from the preset
    rows.append((name, {key: distill[key] for key in keys}, evals))
def shown(weights):
    return " / ".join(str(weights[key]) for key in keys)
steps = sorted({e["step"] for _, _, evals in rows for e in evals})
lines = ["| weighting | w_hard / w_soft / w_layer | " + " | ".join(f"dev BLEU @{s}" for s in steps) + " | dev loss @last |",
         "|---|---|" + "---:|" * (len(steps) + 1)]
for name, weights, evals in rows:
    at = {e["step"]: e for e in evals}
    cells = [f"{at[s]['dev_bleu']:.2f}" if s in at else "" for s in steps]
    lines.append(f"| {name} | {shown(weights)} | " + " | ".join(cells) + f" | {evals[-1]['dev_loss']:.3f} |" if evals
                 else f"| {name} | {shown(weights)} | |")
# the winner, by a rule fixed before any run: the highest mean dev BLEU over the last two evaluations (at most
# UPDATES), ties to the earlier row; RUNS/summary.json names it and its weights as --set arguments
def last_two(evals):
    return sum(e["dev_bleu"] for e in evals[-2:]) / len(evals[-2:]) if evals else float("-inf")
best = max(rows, key=lambda row: last_two(row[2]))  # max keeps the first of equal rows
lines.append(f"\nChosen (highest mean dev BLEU over the last two evaluations): **{best[0]}** ({shown(best[1])}).")
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
summary = {"updates": updates, "rule": "highest mean dev BLEU over the last two evaluations",
           "rows": [{"name": name, **weights, "evals": evals, "score": last_two(evals)} for name, weights, evals in rows],
           "best": best[0], "best_sets": [f"distill.{key}={value}" for key, value in best[1].items()]}
out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
PY
