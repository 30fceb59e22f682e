#!/usr/bin/env bash
# The queue of the pt-en head-to-head as of 2026-11-28 (sequential, for 2 CPU cores): the d256 CKD student
# to early stopping (resumed); its test scores and the deployment benchmark; a 2+2 d192 CKD student and
# its benchmarks in float32 and bf16 (issue 9: 2.5x the teacher at beam 5?); the d256 word-KD and PKD
# students, their test scores and the d256 table (issue 6: is it the combination that helps?); KD
# weightings at d192, 1,500 updates each (experiments/kd_weights.sh); a 2+2 d128 CKD student and its
# benchmark (issue 9 again: d192 gave 2.40x); a dropout-0.3 teacher; a 2+2 d192 no-KD student and the
# d192 word-KD and PKD students with the d192 table (experiments/head_to_head.sh with SET); the d256
# student's bf16 benchmark. Runs of code with checkpoint averaging (b285453 on) are also averaged
# (RUN-avg) and both scored on dev at beam 5 (RUN/dev.json, RUN-avg/dev.json). Every step is skipped
# when done and resumed when interrupted, so after a session ends simply run it again (it first waits
# for a training left running by an earlier driver):
#
#   nohup bash experiments/h2h_queue.sh >> ~/runs/h2h-d192/driver.log 2>&1 &
#
# H2H (default ~/runs/h2h: data, teacher, d256 students), D192 / D128 (default ~/runs/h2h-d192 and
# ~/runs/h2h-d128, with `data` and `teacher` linked to H2H's), NOKD (default ~/runs/gpu-h2h/student-nokd:
# the d256 no-KD student, trained on a GPU), CODE (default: this checkout; the runs of 2026-11-28 used a
# worktree at ~/runs/code, so that editing this checkout does not change a queued run; never move
# a worktree under a running training: modules it imports later come from the new commit), DEPLOY_CODE
# (default CODE: the code of the scoring and deploy steps, e.g. a newer worktree), ROUNDS (default 3:
# benchmark rounds), CORPUS (default ../shared/data/bible/pt-en).
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
code=${CODE:-$here}; h=${H2H:-$HOME/runs/h2h}; runs=${D192:-$HOME/runs/h2h-d192}; d128=${D128:-$HOME/runs/h2h-d128}
nokd=${NOKD:-$HOME/runs/gpu-h2h/student-nokd}
deploy_code=${DEPLOY_CODE:-$code}; rounds=${ROUNDS:-3}  # the code (and benchmark rounds) of the deploy steps
corpus=${CORPUS:-$here/../shared/data/bible/pt-en}
export PYTHONPATH=$code/src CKD=$here/.venv/bin/combinekd PY=$here/.venv/bin/python
ckd=$CKD
cd "$code"
for r in "$runs" "$d128"; do
    mkdir -p "$r"; [ -e "$r/data" ] || ln -s "$h/data" "$r/data"; [ -e "$r/teacher" ] || ln -s "$h/teacher" "$r/teacher"
done
while pgrep -f "combinekd train" > /dev/null; do sleep 30; done  # a run left by an earlier driver
train() {  # [CONFIG=YAML] train RUNS_DIR NAME --set ...: to early stopping (default config: the CPU student), resumed if interrupted
  local r=$1 name=$2; shift 2
  [ -f "$r/$name/train_summary.json" ] && return 0
  local resume=(); [ -d "$r/$name/checkpoints/last" ] && resume=(--resume)
  echo "$r/$name: training ($(date))"
  "$ckd" train "${CONFIG:-configs/student-cpu.yaml}" --set "data_dir=$h/data" --set "output_dir=$r/$name" "$@" \
      "${resume[@]}" >> "$r/$name.log" 2>&1 && echo "$r/$name: done ($(date))"
}
score() {  # score MODEL_DIR [SPLIT]: its scores (MODEL_DIR/SPLIT.json, default test) and hypotheses (SPLIT.hyp.en, for paired bootstrap)
  local m=$1 split=${2:-test}; local -x PYTHONPATH=$deploy_code/src
  [ -f "$m/$split.json" ] || { "$ckd" evaluate "$m" --data "$h/data" --split $split --json --out "$m/$split.hyp.en" \
      > "$m/$split.json.part" && mv "$m/$split.json.part" "$m/$split.json"; }
}
avg() {  # avg MODEL_DIR: the mean of its kept models (MODEL_DIR-avg, `combinekd average`) and both on dev, beam 5
  local m=$1; local -x PYTHONPATH=$deploy_code/src
  [ -d "$m-avg" ] || "$ckd" average "$m" --out "$m-avg" || return 0  # (a run of older code kept none)
  score "$m" dev; score "$m-avg" dev
}
deploy() {  # deploy RUNS_DIR: test scores, CTranslate2 exports and the benchmark of RUNS_DIR/student-ckd
  local r=$1; local -x PYTHONPATH=$deploy_code/src
  score "$r/student-ckd"
  for q in float32 int8; do
    [ -d "$r/student-ckd-ct2-$q" ] || "$ckd" export "$r/student-ckd" --out "$r/student-ckd-ct2-$q" --quantization $q
  done
  benchmark "$r" benchmark-pt-en benchmark "$h/teacher" "$r/student-ckd" "$r/student-ckd-ct2-float32" "$r/student-ckd-ct2-int8"
}
bf16() {  # bf16 RUNS_DIR: teacher and RUNS_DIR/student-ckd benchmarked again with bf16 weights (AMX)
  benchmark "$1" benchmark-pt-en-bf16 benchmark-bf16 "$h/teacher" "$1/student-ckd" --dtype bfloat16
}
benchmark() {  # benchmark RUNS_DIR OUT LOG MODEL... [--dtype D]: RUNS_DIR/OUT.{md,json,png} unless done (log RUNS_DIR/LOG.log)
  local r=$1 out=$2 log=$3; shift 3; local -x PYTHONPATH=$deploy_code/src
  [ -f "$r/$out.json" ] || "$ckd" benchmark "$@" --data "$h/data" --threads 2 --limit 400 --rounds $rounds \
      --out "$r/$out" > "$r/$log.log" 2>&1
}
kd=(--set "distill.teacher=$h/teacher")
d192=(--set model.d_model=192 --set model.ffn_dim=768)
train "$h" student-ckd "${kd[@]}" --set distill.encoder.strategy=overlap || exit 1
[ -f "$h/teacher/test.json" ] || "$ckd" evaluate "$h/teacher" --data "$h/data" --json > "$h/teacher/test.json"
deploy "$h"
train "$runs" student-ckd "${kd[@]}" --set distill.encoder.strategy=overlap "${d192[@]}" || exit 1
deploy "$runs"
bf16 "$runs"
train "$h" student-word "${kd[@]}" --set distill.w_layer=0 || exit 1
score "$h/student-word"; avg "$h/student-word"
train "$h" student-pkd "${kd[@]}" --set distill.encoder.strategy=skip || exit 1
score "$h/student-pkd"; avg "$h/student-pkd"
[ -f "$h/h2h-d256.json" ] || PYTHONPATH=$deploy_code/src "$PY" "$here/experiments/h2h_table.py" --data "$h/data" \
    --out "$h/h2h-d256" "no-KD=$nokd/test.hyp.en" "word-KD=$h/student-word/test.hyp.en" \
    "PKD=$h/student-pkd/test.hyp.en" "CKD=$h/student-ckd/test.hyp.en" "teacher=$h/teacher/test.hyp.en" --versus teacher
# KD weights on dev at 1,500 updates (issue 6, item 4); the d192 CKD run above is the `combinekd` row
NAMES="paper soft-heavy layer-light" SET="model.d_model=192 model.ffn_dim=768" REFERENCE="combinekd=$runs/student-ckd" \
    bash "$here/experiments/kd_weights.sh" "$h/teacher" "$h/data" "$runs/kd-weights" 1500 || exit 1
# issue 9: a 2+2 d128 CKD student (forced-length decoding estimate 4.2x the teacher, results/decode-sizes-2026-11-28.md)
train "$d128" student-ckd "${kd[@]}" --set distill.encoder.strategy=overlap --set model.d_model=128 --set model.ffn_dim=512 || exit 1
deploy "$d128"; avg "$d128/student-ckd"
# A teacher candidate (issue 6, item 3): the teacher's dev loss rose after update 4,200 while its training
# loss fell (over-fitting ~30k pairs), so the same recipe with dropout 0.3
CONFIG=configs/teacher-cpu.yaml train "$h" teacher-dropout03 --set model.dropout=0.3 || exit 1
avg "$h/teacher-dropout03"
train "$runs" student-nokd --set distill=null "${d192[@]}" || exit 1
SET="model.d_model=192 model.ffn_dim=768" bash experiments/head_to_head.sh "$corpus" "$runs" pt en || exit 1
bf16 "$h"
