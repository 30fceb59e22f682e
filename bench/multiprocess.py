"""One process against several: the same global batches and seed, so the same training up to the order
of float sums. Trains CONFIG (dropout 0) twice, for --updates updates each:

    1 process,  grad_accum = P * G        python -m combinekd train
    P processes, grad_accum = G           torchrun --nproc-per-node P -m combinekd train

and prints, update by update, both runs' loss and gradient norm and their largest difference, then the
largest difference between the final weights, and each run's wall time.

    python bench/multiprocess.py --data DATADIR [--config configs/demo-teacher.yaml] [--updates 30]
                                 [--processes 2] [--grad-accum 1]

On CPU the P processes share the machine's cores (train.threads 1 each): the wall times show the
overhead of several processes there, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from combinekd.config import dump_config, load_config


def run(command: list[str], cfg, out: Path) -> float:
    config = out.with_suffix(".yaml")
    config.write_text(dump_config(cfg.model_copy(update={"output_dir": out})), encoding="utf-8")
    start = time.perf_counter()
    done = subprocess.run([*command, "-m", "combinekd", "train", str(config)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/demo-teacher.yaml")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data_dir={args.data}", "model.dropout=0", "train.threads=1",
                                    f"train.max_steps={args.updates}", f"train.eval_every={args.updates}",
                                    "train.eval_max_sentences=8", "train.log_every=1", "train.patience=0"])
    single = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"grad_accum": args.processes * args.grad_accum})})
    several = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": args.grad_accum})})
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        seconds_one = run([sys.executable], single, one)
        seconds_many = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes)],
                           several, many)
        logs = [[e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
                for out in (one, many)]
        weights = [load_file(str(out / "checkpoints/last/objective.safetensors")) for out in (one, many)]

    print(f"{'update':>6} {'loss 1 proc':>12} {f'loss {args.processes} proc':>12} "
          f"{'grad norm 1':>12} {f'grad norm {args.processes}':>12}")
    for a, b in zip(*logs):
        print(f"{a['step']:>6} {a['loss']:>12.5f} {b['loss']:>12.5f} {a['grad_norm']:>12.5f} {b['grad_norm']:>12.5f}")
    loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(*logs))
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(*logs))
    weight = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    print(f"largest difference over {args.updates} updates: loss {loss:.2e}, gradient norm {norm:.2e} "
          f"(both logged rounded to 1e-5); final weights {weight:.2e}")
    print(f"wall time: 1 process {seconds_one:.1f} s, {args.processes} processes {seconds_many:.1f} s")


if __name__ == "__main__":
    main()
