"""Cost of a distillation step against its unavoidable parts, same batches, same run:

    ratio = time(Objective step) / (time(student train step) + time(teacher forward))

    python bench/distill_step.py --data DATADIR [--sizes cpu paper] [--steps 8] [--rounds 1] [--device cuda]
                                 [--set distill.w_layer=0 ...]

"cpu" is configs/teacher-cpu.yaml -> configs/student-cpu.yaml, "paper" is configs/teacher-6x6.yaml ->
configs/student-2x2.yaml (random weights: speed does not depend on them). The KD step runs the
default CKD (encoder overlap groups, linear combiner, w_soft > 0). Target: ratio <= 1.10.

The three are timed in rounds over the same batches (student step, teacher forward, KD step on batch 1,
then on batch 2, ...), so that this machine's drift in speed over a minute (up to 10-15% here) falls on
all three alike; ``--rounds`` repeats the pass over the batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext

import torch

from combinekd.config import load_config
from combinekd.data import collate, load_split, load_tokenizer, token_batches
from combinekd.distill import build_objective, decoder_input_ids
from combinekd.models import build_model, fast_cpu_dropout, save_model_dir, use_bf16

SIZES = {"cpu": ("configs/teacher-cpu.yaml", "configs/student-cpu.yaml"),
         "paper": ("configs/teacher-6x6.yaml", "configs/student-2x2.yaml")}


def timed_rounds(steps: dict, batches, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Mean seconds per batch of each step in ``steps``, run in turn on each batch (after ``warmup``
    batches of each)."""
    for b in batches[:warmup]:
        for step in steps.values():
            step(b)
    total = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for b in batches[warmup:]:
            for name, step in steps.items():
                sync()
                start = time.perf_counter()
                step(b)
                sync()
                total[name] += time.perf_counter() - start
    return {name: seconds / (rounds * len(batches[warmup:])) for name, seconds in total.items()}


def train_step(objective, optimizer, autocast):
    """One update of ``objective`` on a batch, as the trainer runs it: loss, backward, optimizer step."""
    def step(batch):
        with autocast(), fast_cpu_dropout():
            loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(size: str, data: str, steps: int, rounds: int, max_tokens: int | None, device: str = "cpu",
            overrides: list[str] | None = None) -> None:
    teacher_yaml, student_yaml = SIZES[size]
    tokenizer = load_tokenizer(data)
    with tempfile.TemporaryDirectory() as tmp:
        t_cfg = load_config(teacher_yaml, [f"data_dir={data}", f"output_dir={tmp}/t"])
        save_model_dir(build_model(t_cfg.model, tokenizer), tokenizer, f"{tmp}/teacher")
        sets = [f"data_dir={data}", f"output_dir={tmp}/s", f"distill.teacher={tmp}/teacher"]
        if max_tokens:
            sets.append(f"train.max_tokens={max_tokens}")
        cfg = load_config(student_yaml, sets + list(overrides or []))
        cfg.train.bf16 = use_bf16(cfg.train.bf16, device)  # auto: on where bf16 is native, as train does
        split = load_split(data, "train", cfg.model.max_length)
        order = token_batches([len(s) for s in split.src], [len(t) for t in split.tgt], cfg.train.max_tokens, seed=0)
        batches = [{k: v.to(device) for k, v in collate(split, idx, tokenizer.pad_token_id).items()}
                   for idx in order[:steps + 2]]
        autocast = (lambda: torch.autocast(device, torch.bfloat16)) if cfg.train.bf16 else nullcontext

        torch.manual_seed(0)
        kd = build_objective(cfg, tokenizer).to(device)
        kd.collect_stats = False  # as the trainer runs it, but for the last update of each log window
        plain = build_objective(cfg.model_copy(update={"distill": None}), tokenizer).to(device)  # same attention
        teacher = kd.teacher

        @torch.no_grad()
        def teacher_forward(batch):  # the teacher as the KD step runs it (bf16 weights when teacher_bf16)
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=decoder_input_ids(teacher, batch["labels"]))

        s = timed_rounds({"student": train_step(plain, torch.optim.AdamW(plain.parameters(), lr=1e-4), autocast),
                          "teacher": teacher_forward,
                          "kd": train_step(kd, torch.optim.AdamW(kd.parameters(), lr=1e-4), autocast)},
                         batches, rounds)
        student_s, teacher_s, kd_s = s["student"], s["teacher"], s["kd"]
        print(f"[{size}] teacher {t_cfg.model.encoder_layers}+{t_cfg.model.decoder_layers} d{t_cfg.model.d_model} -> "
              f"student {cfg.model.encoder_layers}+{cfg.model.decoder_layers} d{cfg.model.d_model}, "
              f"max_tokens {cfg.train.max_tokens}, " + (f"threads {torch.get_num_threads()}" if device == "cpu"
                                                      else torch.cuda.get_device_name())
              + "".join(f", {kv}" for kv in overrides or []))
        print(f"  student step {student_s:.3f}s + teacher forward {teacher_s:.3f}s = {student_s + teacher_s:.3f}s; "
              f"distillation step {kd_s:.3f}s; ratio {kd_s / (student_s + teacher_s):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", nargs="+", default=["cpu", "paper"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=8, help="timed batches (after 2 for warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the timed batches")
    parser.add_argument("--max-tokens", type=int, default=None, help="override the configs' batch size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the student's config (e.g. distill.w_layer=0: word KD alone)")
    args = parser.parse_args()
    for size in args.sizes:
        measure(size, args.data, args.steps, args.rounds, args.max_tokens, args.device, args.set)


if __name__ == "__main__":
    main()
