#!/usr/bin/env bash
# Continue a CPU run on a rented GPU (the `device` tool of this workplace) for SECONDS, in one call:
#   bash experiments/device_continue.sh CONFIG SECONDS
# Needs, carried in .gpucont/: run.tgz (experiments/compact_checkpoint.py pack RUN run.tgz --no-best),
# data.tgz (the run's `combinekd prepare` DATADIR as data/) and .whl/ (see device_h2h.sh).
# Writes $OUT/train.log and the run compacted again (back.part-*, 15 MB each: cat, then
# compact_checkpoint.py unpack). The recipe is the run's own; only the evaluation batch is larger.
set -uo pipefail
config=${1:?config}; seconds=${2:?seconds}
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
w=/tmp/cont; mkdir -p $w; tar xzf .gpucont/data.tgz -C $w
python3 experiments/compact_checkpoint.py unpack .gpucont/run.tgz $w/run || exit 1
echo "setup $(( $(date +%s) - t0 )) s"
timeout $(( seconds - ($(date +%s) - t0) )) python3 -m combinekd train "$config" --set data_dir=$w/data \
    --set output_dir=$w/run --set train.eval_batch_size=512 --resume > $OUT/train.log 2>&1; echo "train exit $?"
grep dev_bleu $w/run/train_log.jsonl | tail -12
python3 experiments/compact_checkpoint.py pack $w/run /tmp/back.tgz && split -b 15M /tmp/back.tgz $OUT/back.part-
echo "total $(( $(date +%s) - t0 )) s"
