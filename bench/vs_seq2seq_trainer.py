"""End-to-end training speed: combinekd's loop against Hugging Face's Seq2SeqTrainer, one run.

    python bench/vs_seq2seq_trainer.py --data DATADIR [--config configs/teacher-cpu.yaml] [--steps 60]
                                       [--batch-sentences 128]

Same model (built from the config by combinekd, same initialisation seed), same prepared training
data, same precision (bf16 when the config says so), same number of optimizer updates. The
Seq2SeqTrainer side is what a user would write: `group_by_length` (the length-grouped sampler,
successor of the sortish sampler), `per_device_train_batch_size=--batch-sentences`,
DataCollatorForSeq2Seq, AdamW, inverse-sqrt schedule, no evaluation or saving. Prints the target
(non-pad label) tokens per second of each, counted over the updates after the first `--warmup`,
and the ratio combinekd / Seq2SeqTrainer.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from combinekd.config import load_config
from combinekd.data import load_split, load_tokenizer
from combinekd.models import use_bf16


def hf_seq2seq_trainer(cfg, steps: int, warmup: int, batch_sentences: int, attention: str) -> float:
    from transformers import (DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback)

    from combinekd.models import build_model

    tokenizer = load_tokenizer(cfg.data_dir)
    split = load_split(cfg.data_dir, "train", cfg.model.max_length)
    dataset = [{"input_ids": s, "labels": t} for s, t in zip(split.src, split.tgt)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer, attn_implementation=attention)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, padding=True)
    counted = {"tokens": 0, "start": None}

    def collate(features):
        batch = collator(features)
        if counted["start"] is not None:
            counted["tokens"] += int((batch["labels"] != -100).sum())
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                counted["start"], counted["tokens"] = time.perf_counter(), 0

    with tempfile.TemporaryDirectory() as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_sentences,
            learning_rate=cfg.train.lr, warmup_steps=cfg.train.warmup_steps, lr_scheduler_type="inverse_sqrt",
            adam_beta2=0.98, label_smoothing_factor=cfg.train.label_smoothing, bf16=cfg.train.bf16,
            group_by_length=True, max_grad_norm=cfg.train.clip_norm or 1e9, save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to=[], dataloader_num_workers=0,
            remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), seed=cfg.seed)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                 callbacks=[Clock()])
        trainer.train()
    return counted["tokens"] / (time.perf_counter() - counted["start"])


def combinekd_train(cfg, steps: int, warmup: int) -> float:
    import json

    from combinekd.trainer import train

    with tempfile.TemporaryDirectory() as out:
        run = cfg.model_copy(update={"output_dir": out, "train": cfg.train.model_copy(
            update={"max_steps": steps, "eval_every": steps, "eval_max_sentences": 8, "log_every": warmup,
                    "patience": 0})})
        train(run)  # validation (once, at the end) is outside the timed windows
        log = [json.loads(line) for line in open(f"{out}/train_log.jsonl")]
    windows = [e for e in log if "tokens_per_s" in e and e["step"] > warmup]
    return sum(e["tokens_per_s"] for e in windows) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/teacher-cpu.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="updates not timed (first allocations)")
    parser.add_argument("--batch-sentences", type=int, default=128)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"],
                        help="the HF model's attention: sdpa is transformers' default (combinekd trains with "
                             "models.preferred_attention(): eager on CPU)")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data_dir={args.data}", "output_dir=/tmp/unused", *args.set])
    cfg.train.bf16 = use_bf16(cfg.train.bf16)  # auto: on where bf16 is native, as train does
    ours = combinekd_train(cfg, args.steps, args.warmup)
    print(f"combinekd train     : {ours:8.0f} target tokens/s", flush=True)
    theirs = hf_seq2seq_trainer(cfg, args.steps, args.warmup, args.batch_sentences, args.hf_attention)
    print(f"HF Seq2SeqTrainer   : {theirs:8.0f} target tokens/s ({args.hf_attention} attention)")
    print(f"model {cfg.model.arch} {cfg.model.encoder_layers}+{cfg.model.decoder_layers} d{cfg.model.d_model}, "
          f"bf16={cfg.train.bf16}, {args.steps} updates, threads={torch.get_num_threads()}: "
          f"ratio combinekd / Seq2SeqTrainer = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
