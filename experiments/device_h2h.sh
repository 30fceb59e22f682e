#!/usr/bin/env bash
# experiments/head_to_head.sh on a rented GPU machine (the `device` tool of this workplace): one
# 10-minute call. The recipe is the CPU one (configs/teacher-cpu.yaml, configs/student-cpu.yaml:
# same batches, learning rates, evaluation and patience); only the hardware differs, and the
# no-KD student trains beside the teacher, the three KD students together. Deadlines stop a run
# that has not early-stopped in time (its best model so far is used; the logs say which).
#
# Needs, carried along: .whl/ (wheels the machine lacks: pydantic(-core), annotated-types,
# typing-inspection, sacremoses, sacrebleu; and transformers/tokenizers/huggingface_hub to pin 4.57)
# and either .h2hdata/ (a `combinekd prepare` DATADIR) or .h2hcarry/ with data.tgz (that DATADIR as
# data/, gzipped) and any finished runs (e.g. teacher/ with its train_summary.json and its weights,
# bf16 is enough: the KD step holds the teacher in bf16): finished runs are not trained again.
# Writes to $OUT: h2h.tar.gz (logs, configs, summaries, results; no weights) and, in parts of
# 15 MB, the weights trained in this call: the CKD student in fp32, the other models in bf16.
set -uo pipefail
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
printf '#!/bin/sh\nexec python3 -m combinekd "$@"\n' > /tmp/ckd; chmod +x /tmp/ckd
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sacrebleu; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sacrebleu', sacrebleu.__version__, 'cuda', torch.cuda.is_available())"
runs=/tmp/h2h; mkdir -p $runs/smoke
if [ -d .h2hcarry ]; then tar xzf .h2hcarry/data.tgz -C $runs; for d in .h2hcarry/*/; do cp -r "$d" $runs/; done
else cp -r .h2hdata $runs/data; fi
before=$(ls $runs)

# A few-update run of every code path (teacher, KD student with CKD, compare) beside the real runs:
# if it fails, everything stops at once and the call is cheap.
( set -e; s=$runs/smoke
  /tmp/ckd train configs/teacher-cpu.yaml --set data_dir=$runs/data --set output_dir=$s/t --set train.max_steps=4 \
      --set train.eval_every=2 --set train.eval_max_sentences=8
  /tmp/ckd train configs/student-cpu.yaml --set data_dir=$runs/data --set output_dir=$s/s --set distill.teacher=$s/t \
      --set train.max_steps=4 --set train.eval_every=2 --set train.eval_max_sentences=8
  /tmp/ckd compare $s/s $s/t --data $runs/data --limit 8 --beam 2 ) > $runs/smoke.log 2>&1; echo $? > $runs/smoke.rc &

PARALLEL=1 CKD=/tmp/ckd PY=python3 BATCH=128 SET="train.eval_batch_size=${EVAL_BATCH:-512} train.threads=2" \
    TEACHER_DEADLINE=$((t0 + ${TEACHER_SECONDS:-340})) STUDENT_DEADLINE=$((t0 + ${STUDENT_SECONDS:-475})) \
    timeout $(( ${TOTAL_SECONDS:-562} - ($(date +%s) - t0) )) bash experiments/head_to_head.sh unused $runs > $runs/driver.log 2>&1 &
driver=$!
while kill -0 $driver 2>/dev/null; do
    sleep 5
    if [ -f $runs/smoke.rc ] && [ "$(cat $runs/smoke.rc)" != 0 ]; then
        echo "SMOKE FAILED"; tail -30 $runs/smoke.log; pkill -f combinekd; kill $driver; break
    fi
    [ $(( ($(date +%s) - t0) % 60 )) -lt 5 ] && { echo "--- $(( $(date +%s) - t0 )) s"; tail -2 $runs/driver.log; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; }
done
wait $driver; echo "driver exit $?"; cat $runs/driver.log; echo "smoke rc $(cat $runs/smoke.rc 2>/dev/null)"
for r in teacher student-nokd student-word student-pkd student-ckd; do
    echo "== $r"; grep dev_bleu $runs/$r/train_log.jsonl 2>/dev/null | tail -2; cat $runs/$r/train_summary.json 2>/dev/null | head -12
done
(cd $runs && tar czf $OUT/h2h.tar.gz --exclude='*.safetensors' --exclude=data --exclude=smoke . 2>/dev/null)
pack() {  # pack RUN fp32|bf16: the run's weights into $OUT, if trained in this call
    local src=$runs/$1/model.safetensors
    [ -f "$src" ] && ! grep -qx "$1" <<< "$before" || return 0
    if [ "$2" = bf16 ]; then
        python3 experiments/to_bf16.py "$src" /tmp/$1.bf16
        src=/tmp/$1.bf16
    fi
    split -b 15M "$src" "$OUT/$1-$2.part-"
}
pack student-ckd fp32; pack teacher bf16; pack student-pkd bf16; pack student-word bf16
ls -la $OUT; echo "total $(( $(date +%s) - t0 )) s"
