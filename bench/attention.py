"""Which attention implementation is faster here: transformers' SDPA against eager attention, for a
training step (forward, backward, AdamW), a forward pass alone (the KD teacher's part) and greedy
decoding of 64 dev sentences (random weights: each runs to the length bound of `evaluate.translate`,
1.5 x its batch's longest input + 10 tokens), same
batches, bf16 as configured, one model size per config:

    python bench/attention.py --data DATADIR [--configs configs/student-cpu.yaml configs/teacher-cpu.yaml]

combinekd trains and decodes with eager attention on CPU and SDPA on a GPU
(models.preferred_attention), chosen by this bench; run it on your own hardware if it differs.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from combinekd.config import load_config
from combinekd.data import collate, load_split, load_tokenizer, split_text, token_batches
from combinekd.distill import Objective
from combinekd.evaluate import translate
from combinekd.models import build_model, use_bf16

from distill_step import timed_rounds, train_step


def measure(config: str, data: str, steps: int, device: str) -> None:
    tokenizer = load_tokenizer(data)
    cfg = load_config(config, [f"data_dir={data}", "output_dir=unused", "distill=null"])
    cfg.train.bf16 = use_bf16(cfg.train.bf16, device)  # auto: on where bf16 is native, as train does
    split = load_split(data, "train", cfg.model.max_length)
    order = token_batches([len(s) for s in split.src], [len(t) for t in split.tgt], cfg.train.max_tokens, seed=0)
    batches = [{k: v.to(device) for k, v in collate(split, idx, tokenizer.pad_token_id).items()}
               for idx in order[:steps + 2]]
    autocast = (lambda: torch.autocast(device, torch.bfloat16)) if cfg.train.bf16 else nullcontext
    sources = split_text(data, "dev")[0][:64]
    m = cfg.model
    print(f"{config}: {m.encoder_layers}+{m.decoder_layers} d{m.d_model}, max_tokens {cfg.train.max_tokens}, "
          + (f"threads {torch.get_num_threads()}" if device == "cpu" else torch.cuda.get_device_name()))
    for implementation in ("sdpa", "eager", "sdpa", "eager"):  # twice each, interleaved
        torch.manual_seed(0)
        objective = Objective(build_model(cfg.model, tokenizer, attn_implementation=implementation), cfg).to(device)
        train = timed_rounds({"train": train_step(objective, torch.optim.AdamW(objective.parameters(), lr=1e-4), autocast)},
                             batches, 1)["train"]

        @torch.no_grad()
        def forward(batch):
            with autocast():
                objective(batch)
        objective.eval()
        forward_s = timed_rounds({"forward": forward}, batches, 1)["forward"]
        start = time.perf_counter()
        with autocast():
            translate(objective.student, tokenizer, sources, beam=1, batch_size=64)
        print(f"  {implementation:5s}: training step {train:.3f} s, forward alone {forward_s:.3f} s, "
              f"greedy decoding {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--configs", nargs="+", default=["configs/student-cpu.yaml", "configs/teacher-cpu.yaml"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    for config in args.configs:
        measure(config, args.data, args.steps, args.device)


if __name__ == "__main__":
    main()
