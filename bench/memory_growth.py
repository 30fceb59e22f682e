"""Resident memory of the process over KD training steps (the CPU student of configs/student-cpu.yaml
from a teacher dir, bf16 autocast, AdamW, batches in the training order), and seconds per step:

    python bench/memory_growth.py --data DATADIR --teacher TEACHER_DIR [--steps 100]

Run it under different allocator settings (MALLOC_*, ONEDNN_PRIMITIVE_CACHE_CAPACITY) to see what
holds memory; prints the RSS every 20 steps and the mean step time after the first 10.
"""

from __future__ import annotations

import argparse
import time

import torch

from combinekd.config import load_config
from combinekd.data import collate, load_split, load_tokenizer, token_batches
from combinekd.distill import build_objective

from distill_step import train_step


def rss_mb() -> int:
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.data)
    cfg = load_config("configs/student-cpu.yaml", [f"data_dir={args.data}", "output_dir=unused",
                                                   f"distill.teacher={args.teacher}"])
    split = load_split(args.data, "train", cfg.model.max_length)
    order = token_batches([len(s) for s in split.src], [len(t) for t in split.tgt], cfg.train.max_tokens, seed=0)
    torch.manual_seed(0)
    objective = build_objective(cfg, tokenizer)
    objective.collect_stats = False
    step = train_step(objective, torch.optim.AdamW(objective.parameters(), lr=1e-4),
                      lambda: torch.autocast("cpu", torch.bfloat16))
    start = None
    for i, indices in enumerate(order[:args.steps + 1]):
        if i == 10:
            start = time.perf_counter()
        step(collate(split, indices, tokenizer.pad_token_id))
        if i % 20 == 0:
            print(f"step {i}: {rss_mb()} MB", flush=True)
    if start is not None:
        print(f"{(time.perf_counter() - start) / (args.steps - 9):.3f} s a step after the first 10")


if __name__ == "__main__":
    main()
