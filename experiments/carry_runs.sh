#!/usr/bin/env bash
# Pack finished runs of experiments/head_to_head.sh for experiments/device_h2h.sh: writes .h2hcarry/
# (ignored by git) in this checkout with RUNS_DIR/data as data.tgz and each named run without its
# checkpoints, weights in bf16 (the KD step holds a teacher in bf16 anyway).
#
#   bash experiments/carry_runs.sh RUNS_DIR RUN [RUN ...]     e.g. ~/runs/h2h teacher
# RUN may be NAME=DIR (DIR under RUNS_DIR, carried as NAME): e.g. teacher=teacher-d03, the second round's
# teacher as the `teacher` that experiments/head_to_head.sh distils from (and does not train again).
set -euo pipefail
runs=${1:?runs dir}; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
carry="$here/.h2hcarry"
grep -qx "/.h2hcarry/" "$here/.git/info/exclude" 2>/dev/null || echo "/.h2hcarry/" >> "$here/.git/info/exclude"
rm -rf "$carry"; mkdir -p "$carry"
tar czf "$carry/data.tgz" -C "$runs" data
for spec in "$@"; do
    name=${spec%%=*}; run=${spec#*=}
    [ -f "$runs/$run/train_summary.json" ] || { echo "$run has not finished (no train_summary.json)"; exit 2; }
    cp -r "$runs/$run" "$carry/$name"; rm -rf "$carry/$name/checkpoints" "$carry/$name/tensorboard" "$carry/$name/.lock"
    "$here/.venv/bin/python" "$here/experiments/to_bf16.py" "$runs/$run/model.safetensors" "$carry/$name/model.safetensors"
done
du -sh "$carry"
