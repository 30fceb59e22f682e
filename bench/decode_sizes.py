"""How much faster does a student of a given size decode than its teacher? Random weights, every
model forced to write the same number of tokens (``min_new_tokens = max_new_tokens``), so only the
architecture differs; beam 5, batch 32, fp32, the same dev sentences, transformers' ``generate``:

    python bench/decode_sizes.py --data DATADIR [--teacher configs/teacher-cpu.yaml]
        [--students 2x2:256 2x2:192 2x2:128 6x1:256] [--sentences 160] [--new-tokens 48]

A student is LAYERSxLAYERS:WIDTH (encoder x decoder layers, d_model; the feed-forward width in the
teacher's proportion, the teacher's heads, the rest from the teacher's config). Prints sentences/s and the ratio to the teacher.
"""

from __future__ import annotations

import argparse
import time

import torch

from combinekd.config import load_config
from combinekd.data import load_tokenizer, split_text
from combinekd.models import build_model, preferred_attention


def sentences_per_second(model, tokenizer, sources, beam: int, batch_size: int, new_tokens: int) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(sources), batch_size):
            enc = tokenizer(sources[i:i + batch_size], return_tensors="pt", padding=True)
            model.generate(**enc, num_beams=beam, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                           early_stopping=True)
    return len(sources) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", default="configs/teacher-cpu.yaml")
    parser.add_argument("--students", nargs="+", default=["2x2:256", "2x2:192", "2x2:128", "6x1:256"])
    parser.add_argument("--sentences", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.data)
    sources = split_text(args.data, "dev")[0][:args.sentences]
    teacher_cfg = load_config(args.teacher, [f"data_dir={args.data}", "output_dir=unused"]).model
    sizes = {"teacher": teacher_cfg}
    for spec in args.students:
        layers, width = spec.split(":")
        enc, dec = (int(n) for n in layers.split("x"))
        d = int(width)
        sizes[spec] = teacher_cfg.model_copy(update=dict(
            encoder_layers=enc, decoder_layers=dec, d_model=d, ffn_dim=d * teacher_cfg.ffn_dim // teacher_cfg.d_model,
            heads=teacher_cfg.heads if d % teacher_cfg.heads == 0 else 1))
    print(f"beam {args.beam}, batch {args.batch_size}, {len(sources)} sentences x {args.new_tokens} tokens, "
          f"threads {torch.get_num_threads()}, fp32")
    base = None
    for name, cfg in sizes.items():
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer, attn_implementation=preferred_attention())
        params = sum(p.numel() for p in model.parameters()) / 1e6
        speed = sentences_per_second(model, tokenizer, sources, args.beam, args.batch_size, args.new_tokens)
        base = base or speed
        print(f"  {name:8s} {cfg.encoder_layers}+{cfg.decoder_layers} d{cfg.d_model} ffn{cfg.ffn_dim} "
              f"{params:5.1f}M params: {speed:6.1f} sent/s, {speed / base:.2f}x the teacher")


if __name__ == "__main__":
    main()
