#!/usr/bin/env bash
# The converged head-to-head (issue 6): a 6+6 teacher (configs/teacher-cpu.yaml) and four 2+2
# students (configs/student-cpu.yaml): no KD, word KD, PKD (skip {3},{6}), CKD (overlap
# {1,2,3,4},{3,4,5,6}), each trained until early stopping on dev BLEU; then test BLEU/chrF with
# paired bootstrap against the no-KD student.
#
#   bash experiments/head_to_head.sh PARALLEL_PREFIX_DIR RUNS_DIR [SRC TGT]
#   e.g. bash experiments/head_to_head.sh ../shared/data/bible/pt-en ~/runs/h2h pt en
#
# Idempotent and resumable: a finished run (train_summary.json) is skipped, an interrupted one is
# continued with --resume; run it again after a kill or in a later session. Results:
# RUNS_DIR/results.{md,json} (copy them into results/ to commit them).
set -euo pipefail
corpus=${1:?corpus dir with train/dev/test.{SRC,TGT}}; runs=${2:?runs dir}; src=${3:-pt}; tgt=${4:-en}
here="$(cd "$(dirname "$0")/.." && pwd)"
ckd="${CKD:-$here/.venv/bin/combinekd}"
data="$runs/data"
mkdir -p "$runs"

[ -f "$data/meta.json" ] || "$ckd" prepare --src-lang "$src" --tgt-lang "$tgt" --train "$corpus/train" \
    --dev "$corpus/dev" --test "$corpus/test" --vocab-size 8000 --out "$data"

run() {  # run NAME CONFIG [--set ...]
    local name=$1 config=$2; shift 2
    local out="$runs/$name" resume=()
    if [ -f "$out/train_summary.json" ]; then echo "$name: finished"; return; fi
    if [ -d "$out/checkpoints/last" ] || [ -d "$out/checkpoints/last.old" ]; then resume=(--resume); fi
    echo "$name: training ($(date))"
    "$ckd" train "$here/$config" --set "data_dir=$data" --set "output_dir=$out" "$@" "${resume[@]}" \
        > "$runs/$name.log" 2>&1
}

run teacher configs/teacher-cpu.yaml
kd=(--set "distill.teacher=$runs/teacher")
run student-nokd configs/student-cpu.yaml --set distill=null
run student-word configs/student-cpu.yaml "${kd[@]}" --set distill.w_layer=0
run student-pkd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=skip
run student-ckd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=overlap

models=("$runs/student-nokd" "$runs/student-word" "$runs/student-pkd" "$runs/student-ckd" "$runs/teacher")
[ -f "$runs/results.json" ] || "$ckd" compare "${models[@]}" --data "$data" --beam 5 --json > "$runs/results.json"
"$here/.venv/bin/python" - "$runs/results.json" > "$runs/results.md" <<'PY'
import json, sys
from combinekd.evaluate import markdown_table
results = json.load(open(sys.argv[1]))
print(markdown_table(results))
PY
cat "$runs/results.md"
