"""The training loop: accelerate (device, bf16, DDP), token batches, inverse-sqrt schedule,
validation with dev BLEU, atomic safetensors checkpoints, early stopping and exact resume.

The loop optimises whatever ``objective`` it is given: an ``nn.Module`` whose ``forward(batch)``
returns ``{"loss": scalar, ...logged parts}`` and whose ``.student`` is the HF model being
trained (see ``distill.Distiller``). It knows nothing of the KD maths.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from combinekd.config import Config, dump_config
from combinekd.data import (Split, check_writable, collate, load_split, load_tokenizer, read_meta, split_text,
                            token_batches)
from combinekd.errors import UserError


class BatchStream:
    """Endless token batches over epochs, with a resumable position (epoch, batch index).

    Under DDP each process takes every ``world``-th batch of the same epoch order."""

    def __init__(self, split: Split, max_tokens: int, pad_id: int, seed: int, rank: int = 0, world: int = 1):
        self.split, self.max_tokens, self.pad_id, self.seed = split, max_tokens, pad_id, seed
        self.rank, self.world = rank, world
        self.src_lens = [len(s) for s in split.src]
        self.tgt_lens = [len(t) for t in split.tgt]
        self.epoch, self.position = 0, 0
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            batches = token_batches(self.src_lens, self.tgt_lens, self.max_tokens, seed=self.seed, epoch=self.epoch)
            usable = len(batches) // self.world * self.world or len(batches)
            self._batches = batches[:usable][self.rank::self.world]
        return self._batches

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._epoch_batches()):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        indices = self._epoch_batches()[self.position]
        self.position += 1
        return collate(self.split, indices, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._batches = state["epoch"], state["position"], None


# ----------------------------------------------------------------------------- checkpoints
def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict:
    state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value.contiguous() for pid, entry in state["state"].items()
               for key, value in entry.items() if torch.is_tensor(value)}
    save_file(tensors, str(path))
    return {"param_groups": state["param_groups"],
            "scalars": {f"{pid}.{k}": v for pid, e in state["state"].items() for k, v in e.items()
                        if not torch.is_tensor(v)}}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path, extra: dict) -> None:
    state: dict = {}
    for name, value in list(load_file(str(path)).items()) + list(extra["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


def save_checkpoint(path: Path, objective, optimizer, scheduler, stream: BatchStream, progress: dict) -> None:
    """Everything needed for an exact resume, written to a temp dir then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(objective, str(tmp / "objective.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {"progress": progress, "stream": stream.state_dict(), "scheduler": scheduler.state_dict(),
             "optimizer": _save_optimizer(optimizer, tmp / "optimizer.safetensors"),
             "python_random": _jsonable(random.getstate())}
    (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(path: Path, objective, optimizer, scheduler, stream: BatchStream) -> dict:
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # interrupted between the two renames
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"nothing to resume: no checkpoint in {path.parent}")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        load_model(objective, str(path / "objective.safetensors"))
        _load_optimizer(optimizer, path / "optimizer.safetensors", state["optimizer"])
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"the checkpoint in {path} does not match this config (model shape, distill "
                        f"strategy or combiner changed?): {str(exc).splitlines()[0]}") from None
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["stream"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    random.setstate(_tuplify(state["python_random"]))
    return state["progress"]


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(student, tokenizer, dev: Split, dev_text: tuple[list[str], list[str]], cfg: Config,
             autocast) -> dict:
    """Dev cross-entropy per target token and dev BLEU (sacreBLEU, greedy by default)."""
    from combinekd.evaluate import corpus_scores, translate

    student.eval()
    total, tokens = 0.0, 0
    for indices in token_batches([len(s) for s in dev.src], [len(t) for t in dev.tgt], cfg.train.max_tokens,
                                 shuffle=False):
        batch = {k: v.to(student.device) for k, v in collate(dev, indices, tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")  # one forward: the model does not compute its own loss as well
        with autocast():
            logits = student(**batch, decoder_input_ids=student.prepare_decoder_input_ids_from_labels(labels=labels)).logits
        total += torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum").item()
        tokens += int((labels != -100).sum())
    sources, refs = dev_text
    if cfg.train.eval_max_sentences:
        sources, refs = sources[:cfg.train.eval_max_sentences], refs[:cfg.train.eval_max_sentences]
    with autocast():
        hyps = translate(student, tokenizer, sources, beam=cfg.train.eval_beam)
    student.train()
    return {"dev_loss": total / max(tokens, 1), "dev_bleu": corpus_scores(hyps, [refs])["bleu"]}


# ----------------------------------------------------------------------------- the loop
def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output_dir that holds something other than a combinekd run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory: choose another output_dir")
    if out.is_dir() and any(out.iterdir()) and not (
            (out / "train_config.yaml").is_file() or (out / "checkpoints").is_dir()):
        raise UserError(f"output_dir {out} holds files and is not a combinekd run (no train_config.yaml or "
                        "checkpoints/): choose another output_dir")
    check_writable(out)


def train(cfg: Config, resume: bool = False) -> dict:
    """Train ``cfg`` to ``cfg.output_dir`` (a HF model dir with tokenizer); returns the final summary."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import get_inverse_sqrt_schedule, set_seed

    from combinekd.distill import build_objective

    out = Path(cfg.output_dir)
    check_output_dir(out)
    last = out / "checkpoints" / "last"
    if not resume and (last.exists() or last.with_name("last.old").exists()):
        raise UserError(f"{out} already holds a run: add --resume to continue it, or choose another output_dir")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    meta = read_meta(cfg.data_dir)
    tokenizer = load_tokenizer(cfg.data_dir)
    train_split = load_split(cfg.data_dir, "train", cfg.model.max_length)
    dev = load_split(cfg.data_dir, "dev", cfg.model.max_length)
    dev_text = split_text(cfg.data_dir, "dev")

    AcceleratorState._reset_state()  # several runs in one process (tests, experiments) may differ in precision
    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.bf16 else "no")
    set_seed(cfg.seed)
    objective = build_objective(cfg, tokenizer)
    student = objective.student
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  betas=(0.9, 0.98), eps=1e-9, weight_decay=cfg.train.weight_decay)
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=cfg.train.warmup_steps)
    model, optimizer = accelerator.prepare(objective, optimizer)
    objective.to(accelerator.device)
    stream = BatchStream(train_split, cfg.train.max_tokens, tokenizer.pad_token_id, cfg.seed,
                         accelerator.process_index, accelerator.num_processes)
    progress = {"step": 0, "best_bleu": -1.0, "best_step": 0, "bad_evals": 0, "train_seconds": 0.0,
                "target_tokens": 0}
    if resume:
        progress = load_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler, stream)

    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        writer = SummaryWriter(str(out / "tensorboard"))
        log = (out / "train_log.jsonl").open("a", encoding="utf-8")
        description = objective.describe()
        for line in description:
            tqdm.write(line)
    autocast = accelerator.autocast if cfg.train.bf16 else nullcontext  # a factory: called per use

    def record(entry: dict) -> None:
        if main:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, entry["step"])

    if main:
        record({"step": progress["step"], "objective": description, "resumed": resume})
    model.train()
    bar = tqdm(total=cfg.train.max_steps, initial=progress["step"], disable=not main, desc="train", dynamic_ncols=True)
    window_tokens, window_start, window_sums, window_n = 0, time.perf_counter(), {}, 0
    stopped_early = False
    while progress["step"] < cfg.train.max_steps:
        parts: dict[str, torch.Tensor] = {}
        for micro in range(cfg.train.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(stream).items()}
            sync = micro == cfg.train.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                output = model(batch)
                accelerator.backward(output["loss"] / cfg.train.grad_accum)
            for key, value in output.items():  # tensors: turned into floats only when logged
                parts[key] = parts.get(key, 0.0) + value.detach() / cfg.train.grad_accum
            window_tokens += int((batch["labels"] != -100).sum()) * accelerator.num_processes
        if cfg.train.clip_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress["step"] += 1
        window_n += 1
        for key, value in parts.items():
            window_sums[key] = window_sums.get(key, 0.0) + value
        bar.update(1)
        if not math.isfinite(float(parts["loss"])):
            raise UserError(f"the loss became {parts['loss']} at step {progress['step']}: lower train.lr "
                            "or raise train.warmup_steps")
        step = progress["step"]
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            seconds = time.perf_counter() - window_start
            progress["train_seconds"] += seconds
            progress["target_tokens"] += window_tokens
            entry = {"step": step, **{k: round(float(v) / window_n, 5) for k, v in window_sums.items()},
                     "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": round(window_tokens / max(seconds, 1e-9), 1), "epoch": stream.epoch}
            record(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            window_tokens, window_start, window_sums, window_n = 0, time.perf_counter(), {}, 0
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            window_start += _validate_and_save(cfg, accelerator, model, student, tokenizer, dev, dev_text, autocast,
                                               optimizer, scheduler, stream, progress, record, out, last)
            if cfg.train.patience and progress["bad_evals"] >= cfg.train.patience:
                stopped_early = True
                break
    bar.close()
    summary = {"steps": progress["step"], "best_step": progress["best_step"], "best_dev_bleu": progress["best_bleu"],
               "train_seconds": round(progress["train_seconds"], 1), "stopped_early": stopped_early,
               "target_tokens_per_s": round(progress["target_tokens"] / max(progress["train_seconds"], 1e-9), 1),
               "data": str(cfg.data_dir), "pairs": meta["splits"]["train"]["pairs"]}
    if main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        log.close()
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _validate_and_save(cfg, accelerator, model, student, tokenizer, dev, dev_text, autocast, optimizer, scheduler,
                       stream, progress, record, out, last) -> float:
    """Validate, keep the best model in ``out`` and the last checkpoint; returns seconds spent."""
    from combinekd.models import save_model as save_hf_model

    start = time.perf_counter()
    if accelerator.is_main_process:
        scores = validate(accelerator.unwrap_model(model).student, tokenizer, dev, dev_text, cfg, autocast)
        improved = scores["dev_bleu"] > progress["best_bleu"]
        if improved:
            progress.update(best_bleu=scores["dev_bleu"], best_step=progress["step"], bad_evals=0)
            save_hf_model(student, tokenizer, out)
        else:
            progress["bad_evals"] += 1
        record({"step": progress["step"], **{k: round(v, 4) for k, v in scores.items()},
                "best_dev_bleu": progress["best_bleu"], "train_seconds": round(progress["train_seconds"], 1)})
        from tqdm import tqdm

        tqdm.write(f"step {progress['step']}: dev loss {scores['dev_loss']:.3f}, dev BLEU {scores['dev_bleu']:.2f}"
                   f"{' (best)' if improved else ''}")
        save_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler, stream, progress)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # every process needs the same early-stopping decision
        from accelerate.utils import broadcast_object_list

        progress.update(broadcast_object_list([dict(progress)])[0])
    return time.perf_counter() - start
