"""Target tokens/s of combinekd's training step against a bare Hugging Face step, same model, same batches.

    python bench/train_throughput.py --data DATADIR [--config configs/teacher-cpu.yaml] [--steps 12]

Both runs use the same config (model shape, max_tokens, bf16) and the same batches. "bare" is
model(**batch, labels) + loss.backward() + AdamW.step() under torch.autocast; "combinekd" is the
trainer's forward and backward (`trainer.accumulate_gradients`) under accelerate. Prints tokens/s for each and their ratio (ours / bare).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from combinekd.config import load_config
from combinekd.data import collate, load_split, load_tokenizer, token_batches
from combinekd.distill import build_objective
from combinekd.models import build_model, preferred_attention, use_bf16
from combinekd.trainer import accumulate_gradients


def batches(cfg, n: int) -> list[dict]:
    tokenizer = load_tokenizer(cfg.data_dir)
    split = load_split(cfg.data_dir, "train", cfg.model.max_length)
    order = token_batches([len(s) for s in split.src], [len(t) for t in split.tgt], cfg.train.max_tokens, seed=0)
    return [collate(split, idx, tokenizer.pad_token_id) for idx in order[:n]]


def timed(step, data: list[dict], warmup: int = 2) -> float:
    for batch in data[:warmup]:
        step(batch)
    tokens, start = 0, time.perf_counter()
    for batch in data[warmup:]:
        step(batch)
        tokens += int((batch["labels"] != -100).sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/teacher-cpu.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data_dir={args.data}", "output_dir=/tmp/unused", *args.set])
    cfg.train.bf16 = use_bf16(cfg.train.bf16, "cpu")  # auto: on where bf16 is native, as train does
    data = batches(cfg, args.steps + 2)
    tokenizer = load_tokenizer(cfg.data_dir)
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if cfg.train.bf16 else nullcontext

    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer, attn_implementation=preferred_attention())  # as combinekd trains it
    bare_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def bare_step(batch):
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.bf16 else "no")
    torch.manual_seed(0)
    objective = build_objective(cfg, tokenizer)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    wrapped, opt = accelerator.prepare(objective, opt)

    def our_step(batch):  # the trainer's own forward and backward (its CPU dropout included)
        accumulate_gradients(accelerator, wrapped, [batch])
        accelerator.clip_grad_norm_(wrapped.parameters(), cfg.train.clip_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates = {}
    for name, step in (("bare", bare_step), ("combinekd", our_step), ("bare again", bare_step)):
        rates[name] = timed(step, data)
        print(f"{name:>12}: {rates[name]:8.0f} target tokens/s")
    bare = (rates["bare"] + rates["bare again"]) / 2
    print(f"model {cfg.model.encoder_layers}+{cfg.model.decoder_layers} d{cfg.model.d_model}, bf16={cfg.train.bf16}, "
          f"threads={torch.get_num_threads()}: ratio combinekd / bare = {rates['combinekd'] / bare:.3f}")


if __name__ == "__main__":
    main()
