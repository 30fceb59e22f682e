#!/usr/bin/env bash
# The speed benchmarks on a rented GPU (the `device` tool of this workplace), one short call:
# bench/distill_step.py at the CPU and paper sizes and bench/compile.py (eager vs torch.compile)
# for the CPU student. Needs .whl/ and .h2hdata/ carried along, as experiments/device_h2h.sh.
set -uo pipefail
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
echo "setup $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name --format=csv,noheader
python3 bench/distill_step.py --data .h2hdata --sizes cpu paper --steps 20 --device cuda 2>&1 | grep -v -i warn | tee $OUT/distill_step.txt
echo "at $(( $(date +%s) - t0 )) s"
timeout $(( ${TOTAL_SECONDS:-170} - ($(date +%s) - t0) )) python3 bench/compile.py --data .h2hdata --steps 20 --device cuda 2>&1 \
    | grep -v -i warn | tee $OUT/compile.txt
echo "total $(( $(date +%s) - t0 )) s"
