"""Does `torch.compile` pay for a training step here? Eager against compiled (inductor, dynamic shapes),
same model, same batches, one run:

    python bench/compile.py --data DATADIR [--config configs/student-cpu.yaml] [--steps 12] [--device cuda]

Prints the compile time (the first compiled steps, over an eager step's cost) and the steady-state
target tokens/s of each. Token batches vary in shape, so the model is compiled with dynamic=True.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from combinekd.config import load_config
from combinekd.data import load_tokenizer
from combinekd.distill import build_objective
from combinekd.models import use_bf16
from distill_step import sync, train_step
from train_throughput import batches


def run(objective, data: list[dict], autocast, warmup: int) -> tuple[float, float]:
    """(seconds for the first ``warmup`` steps, steady-state target tokens/s over the rest)."""
    step = train_step(objective, torch.optim.AdamW(objective.parameters(), lr=1e-4), autocast)
    start = time.perf_counter()
    for batch in data[:warmup]:
        step(batch)
    sync()
    first = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    for batch in data[warmup:]:
        step(batch)
        tokens += int((batch["labels"] != -100).sum())
    sync()
    return first, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/student-cpu.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps counted as compilation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data_dir={args.data}", "output_dir=/tmp/unused", "distill=null"])
    cfg.train.bf16 = use_bf16(cfg.train.bf16, args.device)  # auto: on where bf16 is native, as train does
    data = [{k: v.to(args.device) for k, v in b.items()} for b in batches(cfg, args.steps + args.warmup)]
    tokenizer = load_tokenizer(cfg.data_dir)
    autocast = (lambda: torch.autocast(args.device, torch.bfloat16)) if cfg.train.bf16 else nullcontext
    results = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        objective = build_objective(cfg, tokenizer).to(args.device)
        if name == "compiled":
            objective.student = torch.compile(objective.student, dynamic=True)
        results[name] = run(objective, data, autocast, args.warmup)
    (eager_first, eager_tps), (comp_first, comp_tps) = results["eager"], results["compiled"]
    per_step = eager_first / args.warmup
    print(f"{cfg.model.encoder_layers}+{cfg.model.decoder_layers} d{cfg.model.d_model}, max_tokens "
          f"{cfg.train.max_tokens}, threads {torch.get_num_threads()}")
    print(f"  eager    {eager_tps:8.0f} target tokens/s")
    print(f"  compiled {comp_tps:8.0f} target tokens/s (x{comp_tps / eager_tps:.2f}); compile cost "
          f"{comp_first - eager_first:.0f} s (= {(comp_first - eager_first) / per_step:.0f} eager steps)")


if __name__ == "__main__":
    main()
