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
#
# Environment (all optional): CKD / PY: the combinekd command and the Python that has combinekd
# (default: this checkout's .venv); PARALLEL=1: train the no-KD student beside the teacher and the
# three KD students together (for a GPU; on 2 CPU cores they would only slow each other down);
# SET="key=value ...": extra --set for every run (e.g. train.eval_batch_size=128 on a GPU);
# TEACHER_DEADLINE / STUDENT_DEADLINE: epoch seconds after which the teacher's / the students'
# training is stopped (their best model so far is kept and used; the log says so); BATCH: sentences
# per decoding batch in the final comparison.
set -euo pipefail
corpus=${1:?corpus dir with train/dev/test.{SRC,TGT}}; runs=${2:?runs dir}; src=${3:-pt}; tgt=${4:-en}
here="$(cd "$(dirname "$0")/.." && pwd)"
ckd="${CKD:-$here/.venv/bin/combinekd}"
py="${PY:-$here/.venv/bin/python}"
data="$runs/data"
extra=(); for kv in ${SET:-}; do extra+=(--set "$kv"); done
mkdir -p "$runs"

[ -f "$data/meta.json" ] || "$ckd" prepare --src-lang "$src" --tgt-lang "$tgt" --train "$corpus/train" \
    --dev "$corpus/dev" --test "$corpus/test" --vocab-size 8000 --out "$data"

run() {  # run DEADLINE NAME CONFIG [--set ...]
    local deadline=$1 name=$2 config=$3; shift 3
    local out="$runs/$name" resume=() limit=()
    if [ -f "$out/train_summary.json" ]; then echo "$name: finished"; return; fi
    if [ -d "$out/checkpoints/last" ] || [ -d "$out/checkpoints/last.old" ]; then resume=(--resume); fi
    if [ -n "$deadline" ]; then
        local left=$((deadline - $(date +%s)))
        if [ "$left" -le 0 ]; then echo "$name: past its deadline, not started"; return; fi
        limit=(timeout "$left")
    fi
    echo "$name: training ($(date))"
    local rc=0
    "${limit[@]}" "$ckd" train "$here/$config" --set "data_dir=$data" --set "output_dir=$out" "$@" \
        "${extra[@]}" "${resume[@]}" > "$runs/$name.log" 2>&1 || rc=$?
    if [ "$rc" = 124 ]; then echo "$name: stopped at its deadline ($(date)); its best model so far is kept"
    elif [ "$rc" != 0 ]; then echo "$name: FAILED (exit $rc), see $runs/$name.log"; tail -5 "$runs/$name.log"; return "$rc"
    else echo "$name: done ($(date))"; fi
}

kd=(--set "distill.teacher=$runs/teacher")
if [ -n "${PARALLEL:-}" ]; then
    run "${STUDENT_DEADLINE:-}" student-nokd configs/student-cpu.yaml --set distill=null & nokd=$!
    run "${TEACHER_DEADLINE:-}" teacher configs/teacher-cpu.yaml
    run "${STUDENT_DEADLINE:-}" student-word configs/student-cpu.yaml "${kd[@]}" --set distill.w_layer=0 & word=$!
    run "${STUDENT_DEADLINE:-}" student-pkd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=skip & pkd=$!
    run "${STUDENT_DEADLINE:-}" student-ckd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=overlap
    wait "$nokd"; wait "$word"; wait "$pkd"
else
    run "${TEACHER_DEADLINE:-}" teacher configs/teacher-cpu.yaml
    # CKD, the method under test, first; the no-KD baseline last (the cheapest run, and the one most
    # likely to exist already: a GPU run of the same recipe)
    run "${STUDENT_DEADLINE:-}" student-ckd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=overlap
    run "${STUDENT_DEADLINE:-}" student-word configs/student-cpu.yaml "${kd[@]}" --set distill.w_layer=0
    run "${STUDENT_DEADLINE:-}" student-pkd configs/student-cpu.yaml "${kd[@]}" --set distill.encoder.strategy=skip
    run "${STUDENT_DEADLINE:-}" student-nokd configs/student-cpu.yaml --set distill=null
fi

models=("$runs/student-nokd" "$runs/student-word" "$runs/student-pkd" "$runs/student-ckd" "$runs/teacher")
[ -f "$runs/results.json" ] || "$ckd" compare "${models[@]}" --data "$data" --beam 5 --batch-size "${BATCH:-32}" \
    --json > "$runs/results.json"
"$py" - "$runs/results.json" > "$runs/results.md" <<'PY'
import json, sys
from combinekd.evaluate import markdown_table
results = json.load(open(sys.argv[1]))
print(markdown_table(results))
PY
cat "$runs/results.md"
