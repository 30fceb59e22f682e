"""The training loop: accelerate (device, bf16, DDP), token batches, learning-rate schedule,
validation with dev BLEU, atomic safetensors checkpoints, early stopping and exact resume.

The loop optimises whatever ``objective`` it is given (``train(cfg, objective)``; by default the one the
config describes): an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": scalar, ...logged parts}``
and whose ``.student`` is the HF model being trained (see ``distill.Objective``). It knows nothing of
the KD maths. Where the run stands is one :class:`TrainerState`, saved with every checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from combinekd.average import keep_model
from combinekd.config import Config, dump_config
from combinekd.data import (Split, check_writable, collate, load_split, load_tokenizer, read_meta, split_text,
                            token_batches)
from combinekd.errors import PeerStopped, UserError, warn
from combinekd.card import SCORES_FILE, write_train_card
from combinekd.files import atomic_dir, exclusive_lock, recover
from combinekd.models import fast_cpu_dropout, slow_bf16_warning, use_bf16

# train.patience_on=bleu-or-loss: a dev loss this fraction below the lowest so far counts as an improvement
LOSS_IMPROVEMENT = 1e-3


class BatchStream:
    """Endless token batches over epochs, with a resumable position.

    Every process computes the same sequence of batches (epoch 0's shuffled batches, then epoch 1's, ...)
    and process ``rank`` of ``world`` takes items ``rank``, ``rank + world``, ``rank + 2 * world``... So
    an update of G micro-batches on W processes trains on G * W consecutive batches of that sequence,
    the same as one process with ``grad_accum`` G * W, and an epoch with fewer batches than processes
    simply runs on into the next one."""

    def __init__(self, split: Split, max_tokens: int, pad_id: int, seed: int, rank: int = 0, world: int = 1):
        self.split, self.max_tokens, self.pad_id, self.seed = split, max_tokens, pad_id, seed
        self.rank, self.world = rank, world
        self.src_lens = [len(s) for s in split.src]
        self.tgt_lens = [len(t) for t in split.tgt]
        self.epoch, self.batch = 0, 0  # where the next round of `world` batches starts: the same on every process
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = token_batches(self.src_lens, self.tgt_lens, self.max_tokens, seed=self.seed,
                                          epoch=self.epoch)
        return self._batches

    def _skip(self, n: int) -> None:
        self.batch += n
        while self.batch >= len(self._epoch_batches()):
            self.epoch, self.batch, self._batches = self.epoch + 1, self.batch - len(self._epoch_batches()), None

    def __next__(self) -> dict[str, torch.Tensor]:
        self._skip(self.rank)
        indices = self._epoch_batches()[self.batch]
        self._skip(self.world - self.rank)
        return collate(self.split, indices, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        # before the processes shared one sequence, "position" counted this process's batches in the epoch
        batch = state["batch"] if "batch" in state else state["position"] * self.world
        self.epoch, self.batch, self._batches = state["epoch"], 0, None
        self._skip(batch)


@dataclass
class TrainerState:
    """Where a run stands; saved as ``progress`` in ``trainer_state.json`` with every checkpoint."""

    step: int = 0
    best_bleu: float = -1.0
    best_step: int = 0
    best_loss: float | None = None  # the lowest dev loss so far (train.patience_on)
    bad_evals: int = 0  # evaluations in a row that improved nothing (train.patience, train.patience_on)
    bad_steps: int = 0  # updates in a row with a non-finite loss (train.max_bad_steps)
    target_tokens: int = 0
    train_seconds: float = 0.0
    teacher_seconds: float = 0.0
    validation_seconds: float = 0.0
    saving_seconds: float = 0.0
    stopped_early: bool = False
    out_of_time: bool = False  # train.max_hours spent
    finished: bool = False
    schedule_end: int = 0  # the update where a linear schedule reaches zero (0: open-ended, inverse-sqrt)

    def evaluated(self, dev_bleu: float, dev_loss: float, patience_on: str) -> bool:
        """Account for an evaluation at ``self.step``: the best dev BLEU and its update, the lowest dev loss, and
        the evaluations in a row that improved nothing (``train.patience_on``: a better dev BLEU, or with
        ``bleu-or-loss`` a dev loss LOSS_IMPROVEMENT below the lowest so far). Returns whether dev BLEU improved
        (the model to keep)."""
        improved = dev_bleu > self.best_bleu
        lower_loss = self.best_loss is None or dev_loss < self.best_loss * (1 - LOSS_IMPROVEMENT)
        self.best_loss = dev_loss if self.best_loss is None else min(self.best_loss, dev_loss)
        if improved:
            self.best_bleu, self.best_step = dev_bleu, self.step
        progress = improved or (lower_loss and patience_on == "bleu-or-loss")
        self.bad_evals = 0 if progress else self.bad_evals + 1
        return improved

    def spent_hours(self) -> float:
        """The run's time so far (training, validation, saving), the measure of ``train.max_hours``."""
        return (self.train_seconds + self.validation_seconds + self.saving_seconds) / 3600

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # keys missing from an older checkpoint keep their defaults
        for field in fields(self):
            if field.name in state:
                setattr(self, field.name, state[field.name])


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


def rng_state() -> dict:
    """This process's random generators: torch's (CPU and every CUDA device) and Python's ``random``."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return {"tensors": tensors, "python_random": _jsonable(random.getstate())}


def save_checkpoint(path: Path, objective, optimizer, scheduler, stream: BatchStream, state: TrainerState,
                    rng_states: list[dict] | None = None) -> None:
    """Everything needed for an exact resume, staged in a temp dir then renamed into place.

    ``rng_states`` holds every process's :func:`rng_state` (default: this one's), one file each."""
    rng_states = rng_states or [rng_state()]
    with atomic_dir(path) as tmp:
        save_model(objective, str(tmp / "objective.safetensors"))
        _pause_for_tests(tmp, state.step)
        for rank, rng in enumerate(rng_states):
            save_file(rng["tensors"], str(tmp / f"rng.{rank}.safetensors"),
                      metadata={"python_random": json.dumps(rng["python_random"])})
        saved = {"progress": state.state_dict(), "stream": stream.state_dict(), "scheduler": scheduler.state_dict(),
                 "optimizer": _save_optimizer(optimizer, tmp / "optimizer.safetensors"),
                 "processes": len(rng_states)}
        (tmp / "trainer_state.json").write_text(json.dumps(saved), encoding="utf-8")


def _pause_for_tests(staging: Path, step: int) -> None:
    """Test hook: with ``COMBINEKD_TEST_PAUSE_CHECKPOINT=N`` the checkpoint of update N stops half-written
    (weights staged, nothing else) and ``staging/PAUSED`` appears, so that a test can kill the run there."""
    if os.environ.get("COMBINEKD_TEST_PAUSE_CHECKPOINT") == str(step):
        (staging / "PAUSED").touch()
        time.sleep(600)


def _fail_for_tests(rank: int, step: int) -> None:
    """Test hook: with ``COMBINEKD_TEST_FAIL=RANK:STEP`` process RANK fails after update STEP."""
    if os.environ.get("COMBINEKD_TEST_FAIL") == f"{rank}:{step}":
        raise UserError(f"test failure on process {rank} after update {step}")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(path: Path, objective, optimizer, scheduler, stream: BatchStream, state: TrainerState) -> None:
    """Restore a :func:`save_checkpoint`; the random generators are those of process ``stream.rank``."""
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"nothing to resume: no checkpoint in {path.parent}")
    try:
        saved = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        load_model(objective, str(path / "objective.safetensors"))
        _load_optimizer(optimizer, path / "optimizer.safetensors", saved["optimizer"])
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"the checkpoint in {path} does not match this config (model shape, distill "
                        f"strategy or combiner changed?): {str(exc).splitlines()[0]}") from None
    if saved.get("processes", 1) != stream.world:
        raise UserError(f"the checkpoint in {path} was written by {saved.get('processes', 1)} processes: "
                        f"resume with as many (this run has {stream.world})")
    scheduler.load_state_dict(saved["scheduler"])
    stream.load_state_dict(saved["stream"])
    state.load_state_dict(saved["progress"])
    _load_rng(path, stream.rank, saved)


def _load_rng(path: Path, rank: int, state: dict) -> None:
    """Set this process's random generators from its file (``rng.RANK.safetensors``)."""
    file = path / f"rng.{rank}.safetensors"
    if file.is_file():
        rng = load_file(str(file))
        with safe_open(str(file), "pt") as handle:
            python_random = json.loads(handle.metadata()["python_random"])
    else:  # written before per-process files: one file, Python's state in trainer_state.json
        rng, python_random = load_file(str(path / "rng.safetensors")), state["python_random"]
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    random.setstate(_tuplify(python_random))


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(student, tokenizer, dev: Split, dev_text: tuple[list[str], list[str]], cfg: Config,
             autocast) -> dict:
    """Dev cross-entropy per target token and dev BLEU (sacreBLEU, greedy by default)."""
    from combinekd.distill import decoder_input_ids, forward_to_logits
    from combinekd.evaluate import corpus_scores, translate
    from combinekd.losses import vocab_losses

    student.eval()
    total, tokens = 0.0, 0
    for indices in token_batches([len(s) for s in dev.src], [len(t) for t in dev.tgt], cfg.train.max_tokens,
                                 shuffle=False):
        batch = {k: v.to(student.device) for k, v in collate(dev, indices, tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")  # one forward: the model does not compute its own loss as well
        with autocast():
            logits = forward_to_logits(student, {**batch, "decoder_input_ids": decoder_input_ids(student, labels)})[1]
        n = int((labels != -100).sum())
        total += vocab_losses(logits, None, labels, label_smoothing=0.0)[1].item() * n  # mean CE x tokens
        tokens += n
    sources, refs = dev_text
    if cfg.train.eval_max_sentences:
        sources, refs = sources[:cfg.train.eval_max_sentences], refs[:cfg.train.eval_max_sentences]
    with autocast():
        hyps = translate(student, tokenizer, sources, beam=cfg.train.eval_beam, batch_size=cfg.train.eval_batch_size)
    student.train()
    return {"dev_loss": total / max(tokens, 1), "dev_bleu": corpus_scores(hyps, [refs])["bleu"]}


# ----------------------------------------------------------------------------- the loop
def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output_dir that holds something other than a combinekd run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory: choose another output_dir")
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()) and not (
            (out / "train_config.yaml").is_file() or (out / "checkpoints").is_dir()):
        raise UserError(f"output_dir {out} holds files and is not a combinekd run (no train_config.yaml or "
                        "checkpoints/): choose another output_dir")
    check_writable(out)


def train(cfg: Config, objective=None, resume: bool = False) -> dict:
    """Train ``cfg`` to ``cfg.output_dir`` (a HF model dir with tokenizer); returns the final summary.

    ``objective`` is what is optimised (see above); None: the one ``cfg`` describes, built after seeding
    with ``cfg.seed`` (:func:`distill.build_objective`). Every process of a job must be given the same.

    The first process holds ``output_dir/.lock`` for the whole run, so a second run into the same
    directory is refused; it also cleans up after a run that was killed while writing a checkpoint."""
    out = Path(cfg.output_dir)
    check_output_dir(out)
    try:
        if not first_process():
            return _train(cfg, objective, resume)
        with exclusive_lock(out, "`combinekd train`"):
            recover(out / "checkpoints" / "last")
            return _train(cfg, objective, resume)
    except RuntimeError as exc:  # gloo, when another process ended (after printing its own error)
        if "by peer" not in str(exc) or not torch.distributed.is_initialized():
            raise
        raise PeerStopped("another process of this run stopped: see its error") from None


def first_process() -> bool:
    """Process 0 of a ``torchrun`` / ``accelerate launch`` job, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def _train(cfg: Config, objective, resume: bool) -> dict:
    """The run itself (see :func:`train`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import set_seed

    from combinekd.distill import build_objective

    out = Path(cfg.output_dir)  # checked by train() before the lock was taken
    last = out / "checkpoints" / "last"
    if not resume and last.exists():
        raise UserError(f"{out} already holds a run: add --resume to continue it, or choose another output_dir")
    meta = read_meta(cfg.data_dir)
    if resume and (done := _finished_run(last, cfg)):
        message, state = done
        if first_process():
            print(f"combinekd: {message}", file=sys.stderr)
        return _summary(cfg, meta, state)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tokenizer = load_tokenizer(cfg.data_dir)
    train_split = load_split(cfg.data_dir, "train", cfg.model.max_length)
    dev = load_split(cfg.data_dir, "dev", cfg.model.max_length)
    dev_text = split_text(cfg.data_dir, "dev")

    AcceleratorState._reset_state()  # several runs in one process (tests, experiments) may differ in precision
    # without cpu=True accelerate takes each CPU process of a torchrun job for a job of its own
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    bf16 = use_bf16(cfg.train.bf16)  # auto: on where bf16 is native (models.native_bf16)
    accelerator = Accelerator(cpu=several and not torch.cuda.is_available(),
                              mixed_precision="bf16" if bf16 else "no")
    rank = accelerator.process_index
    set_seed(cfg.seed)  # the same initial weights on every process
    if objective is None:
        objective = build_objective(cfg, tokenizer)
    if rank:  # but each process its own dropout; process 0 goes on from cfg.seed, as a single process does
        set_seed(cfg.seed + rank)
    student = objective.student
    # (after the objective: its user errors come first, alone)
    forced = [key for key, on in (("train.bf16", cfg.train.bf16),
                                  ("distill.teacher_bf16", cfg.distill and cfg.distill.teacher_bf16)) if on is True]
    if forced and rank == 0 and (why := slow_bf16_warning(accelerator.device)):
        warn(f"{' and '.join(forced)} on, but {why}: consider " + " ".join(f"--set {key}=auto" for key in forced))
    # fused: one kernel over all parameters, as Seq2SeqTrainer's default on torch >= 2.8: 5-7 ms against 19-21 ms
    # an update for 12.6M parameters on 2 CPU threads; end to end within noise there (results/speed-2026-12-06.md)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  betas=(0.9, 0.98), eps=1e-9, weight_decay=cfg.train.weight_decay,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    scheduler = build_schedule(optimizer, cfg)
    model, optimizer = accelerator.prepare(objective, optimizer)
    objective.to(accelerator.device)
    stream = BatchStream(train_split, cfg.train.max_tokens, tokenizer.pad_token_id, cfg.seed,
                         rank, accelerator.num_processes)
    state = TrainerState(schedule_end=_schedule_end(cfg))
    if resume:
        load_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler, stream, state)

    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    log = RunLog(out, main, cfg.train.max_steps, state.step)
    record, bar = log.record, log.bar
    description = objective.describe()
    teacher = objective.teacher
    precision = ("bf16 autocast" if bf16 else "float32") + ("" if teacher is None else
                                                            f", teacher in {str(teacher.dtype).removeprefix('torch.')}")
    if "auto" in (cfg.train.bf16, cfg.distill and cfg.distill.teacher_bf16) and (
            why := slow_bf16_warning(accelerator.device)):
        precision += f" (bf16 auto: {why})"
    for line in (*description, f"precision: {precision}"):
        log.say(line)
    record({"step": state.step, "objective": description, "precision": precision, "resumed": resume,
            "processes": stream.world})
    autocast = accelerator.autocast if bf16 else nullcontext  # a factory: called per use
    model.train()
    window_tokens, window_start, window_sums, window_norm, window_n = 0, time.perf_counter(), {}, 0.0, 0
    window_counts: dict[str, int] = {}
    while state.step < cfg.train.max_steps:
        micro_batches = [{k: v.to(accelerator.device) for k, v in next(stream).items()}
                         for _ in range(cfg.train.grad_accum)]
        # per-layer diagnostics cost ~2% of a KD step: computed for the last update of each log window only
        objective.collect_stats = (state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == cfg.train.max_steps
        parts, update_tokens = accumulate_gradients(accelerator, model, micro_batches)
        window_tokens += update_tokens
        if not _finite_everywhere(accelerator, parts["loss"]):
            _skip_update(cfg, optimizer, state, record)
            continue
        state.bad_steps = 0
        # measured (for the log) without clipping too (clip_norm 0): the same on every process
        window_norm = window_norm + accelerator.clip_grad_norm_(model.parameters(),
                                                                cfg.train.clip_norm or float("inf")).detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window_n += 1
        for key, value in parts.items():
            window_sums[key] = window_sums.get(key, 0.0) + value
            window_counts[key] = window_counts.get(key, 0) + 1
        bar.update(1)
        step = state.step
        _fail_for_tests(rank, step)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            seconds = time.perf_counter() - window_start
            state.train_seconds += seconds
            state.teacher_seconds += accelerator.unwrap_model(model).pop_teacher_seconds()
            state.target_tokens += window_tokens
            entry = {"step": step, **_window_means(accelerator, window_sums, window_counts),
                     "grad_norm": round(float(window_norm) / window_n, 5), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": round(window_tokens / max(seconds, 1e-9), 1), "epoch": stream.epoch}
            record(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            window_tokens, window_start, window_sums, window_norm, window_n = 0, time.perf_counter(), {}, 0.0, 0
            window_counts = {}
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            window_start += _validate_and_save(cfg, accelerator, model, student, tokenizer, dev, dev_text, autocast,
                                               optimizer, scheduler, stream, state, record, out, last)
            if state.stopped_early or state.out_of_time:
                break
    log.close()
    summary = _summary(cfg, meta, state)
    if main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        write_train_card(out)  # README.md: the best model's card
    accelerator.wait_for_everyone()
    # DDP's reducer must not hold the last reference to the process group: freed from there, gloo's
    # destructor joins its worker threads with the GIL held while they may need it (a hang at exit, about
    # one run in five on 2 busy cores). Freed by destroy_process_group (from Python), it releases the GIL.
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return summary


class RunLog:
    """A run's logs in one object: ``train_log.jsonl``, TensorBoard scalars and the console (a tqdm bar
    and lines). Silent on every process but the main one."""

    def __init__(self, out: Path, active: bool, total_steps: int, initial_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.active = active
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not active, desc="train", dynamic_ncols=True)
        if active:
            self.writer = SummaryWriter(str(out / "tensorboard"))
            self.file = (out / "train_log.jsonl").open("a", encoding="utf-8")

    def record(self, entry: dict) -> None:
        """One JSON line; every number in it (but the step) also becomes a TensorBoard scalar."""
        if not self.active:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, entry["step"])

    def say(self, line: str) -> None:
        if self.active:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.active:
            self.file.close()
            self.writer.close()


def _summary(cfg: Config, meta: dict, state: TrainerState) -> dict:
    """What ``train`` returns and writes to ``train_summary.json``."""
    return {"steps": state.step, "best_step": state.best_step, "best_dev_bleu": state.best_bleu,
            "train_seconds": round(state.train_seconds, 1), "stopped_early": state.stopped_early,
            "stopped_by": _stopped_by(cfg, state),
            "target_tokens_per_s": round(state.target_tokens / max(state.train_seconds, 1e-9), 1),
            "wall_seconds": {"training": round(state.train_seconds, 1),
                             "of_which_teacher_forward": _teacher_seconds(state),
                             "validation": round(state.validation_seconds, 1),
                             "saving_models_and_checkpoints": round(state.saving_seconds, 1)},
            "data": str(cfg.data_dir), "pairs": meta["splits"]["train"]["pairs"]}


def _stopped_by(cfg: Config, state: TrainerState) -> str | None:
    """Why the run stopped (None while it runs): early stopping, then its last update, then its time
    budget, in the order ``_finished_run`` reports them."""
    if state.stopped_early:
        return "patience"
    if state.step >= cfg.train.max_steps:
        return "max_steps"
    return "max_hours" if state.out_of_time else None


def _teacher_seconds(state: TrainerState) -> float | None:
    """Time in the teacher's forward passes: measured on CPU; on a GPU kernels run asynchronously and
    the host-side time would mislead, so it is not reported there."""
    return None if torch.cuda.is_available() else round(state.teacher_seconds, 3)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Config):
    """Linear warm-up over ``train.warmup_steps``, then ``train.schedule``: inverse square root, or linear decay
    to zero at ``train.max_steps`` (transformers' schedules)."""
    from transformers import get_inverse_sqrt_schedule, get_linear_schedule_with_warmup

    if cfg.train.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
    return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=cfg.train.warmup_steps)


def _schedule_end(cfg: Config) -> int:
    return cfg.train.max_steps if cfg.train.schedule == "linear" else 0


def _finished_run(last: Path, cfg: Config) -> tuple[str, TrainerState] | None:
    """``(why, state)`` when the checkpoint in ``last`` ended its run: stopped early, reached
    ``cfg.train.max_steps`` or spent ``cfg.train.max_hours`` (raising ``cfg.train.patience``, the
    steps or the hours, whichever ended it, trains on). Refuses a resume whose learning-rate schedule differs
    from the run's (a linear schedule is fixed by the run's max_steps)."""
    file = last / "trainer_state.json"
    if not file.is_file():
        return None  # load_checkpoint says what is missing
    state = TrainerState()
    state.load_state_dict(json.loads(file.read_text(encoding="utf-8"))["progress"])
    where = last.parent.parent
    if state.schedule_end != _schedule_end(cfg):
        run = (f"a linear schedule to zero at update {state.schedule_end}" if state.schedule_end
               else "the inverse-sqrt schedule")
        raise UserError(f"the run in {where} was trained with {run}: resume it with the same train.schedule"
                        + (f" and train.max_steps={state.schedule_end}" if state.schedule_end else ""))
    if state.stopped_early and cfg.train.patience and state.bad_evals >= cfg.train.patience:
        return (f"the run in {where} stopped early at update {state.step} ({state.bad_evals} evaluations in a row "
                f"that improved nothing): nothing to resume; raise train.patience to train on", state)
    if state.step >= cfg.train.max_steps:
        return (f"the run in {where} already finished ({state.step} updates, train.max_steps="
                f"{cfg.train.max_steps}): nothing to resume; raise train.max_steps to train on", state)
    if cfg.train.max_hours and state.spent_hours() >= cfg.train.max_hours:
        return (f"the run in {where} spent its time budget at update {state.step} ({state.spent_hours():.2f} hours, "
                f"train.max_hours={cfg.train.max_hours:g}): nothing to resume; raise train.max_hours to train on",
                state)
    return None


def accumulate_gradients(accelerator, model, micro_batches: list[dict]) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward the micro-batches of one update; returns this process's share of the update's
    loss parts (tensors; summed over the processes they are the update's token-weighted means) and the
    update's target tokens over all processes.

    Each micro-batch's per-token loss is weighted by its share of the target tokens of the whole update
    (all micro-batches, all processes), as fairseq does: the gradient is that of the loss summed over the
    update's tokens divided by their number, however the tokens fall into micro-batches or processes.
    (DDP averages gradients over processes, hence the factor ``num_processes``.)"""
    tokens = [int((batch["labels"] != -100).sum()) for batch in micro_batches]
    total = int(accelerator.reduce(torch.tensor(sum(tokens), device=accelerator.device), reduction="sum"))
    parts: dict[str, torch.Tensor] = {}
    for micro, (batch, n) in enumerate(zip(micro_batches, tokens)):
        last = micro == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model), fast_cpu_dropout():
            output = model(batch)
            accelerator.backward(output["loss"] * (n * accelerator.num_processes / max(total, 1)))
        for key, value in output.items():  # tensors: turned into floats only when logged
            parts[key] = parts.get(key, 0.0) + value.detach() * (n / max(total, 1))
    return parts, total


def _window_means(accelerator, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
    """The logged loss parts: means over the window's updates that computed them, and over all processes."""
    names = list(sums)  # the same parts, in the same order, on every process
    totals = accelerator.reduce(torch.stack([sums[name].float() for name in names]), reduction="sum")
    return {name: round(float(value) / counts[name], 5) for name, value in zip(names, totals.tolist())}


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether the update's loss is finite on every process (a NaN gradient on one reaches all)."""
    bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    return float(accelerator.reduce(bad, reduction="sum")) == 0


def _skip_update(cfg: Config, optimizer, state: TrainerState, record) -> None:
    """Drop the gradients of an update whose loss is not finite; stop after ``train.max_bad_steps`` in a row."""
    optimizer.zero_grad(set_to_none=True)
    state.bad_steps += 1
    record({"step": state.step, "skipped_update": "non-finite loss", "bad_steps": state.bad_steps})
    if state.bad_steps >= cfg.train.max_bad_steps:
        raise UserError(f"the loss was not finite in {state.bad_steps} updates in a row (after update "
                        f"{state.step}; train.max_bad_steps={cfg.train.max_bad_steps}): lower train.lr "
                        f"or raise train.warmup_steps")


def _validate_and_save(cfg, accelerator, model, student, tokenizer, dev, dev_text, autocast, optimizer, scheduler,
                       stream, state: TrainerState, record, out, last) -> float:
    """Validate, keep the best model in ``out`` and the last checkpoint; returns seconds spent."""
    from accelerate.utils import gather_object

    from combinekd.models import save_model_dir

    start = time.perf_counter()
    if accelerator.is_main_process:
        scores = validate(accelerator.unwrap_model(model).student, tokenizer, dev, dev_text, cfg, autocast)
        state.validation_seconds += time.perf_counter() - start
        improved = state.evaluated(scores["dev_bleu"], scores["dev_loss"], cfg.train.patience_on)
        if improved:
            saving = time.perf_counter()
            save_model_dir(student, tokenizer, out)
            (out / SCORES_FILE).unlink(missing_ok=True)  # evaluations of the model this one replaces
            state.saving_seconds += time.perf_counter() - saving
        saving = time.perf_counter()
        keep_model(student, out, state.step, cfg.train.keep_models)  # for `combinekd average`
        state.saving_seconds += time.perf_counter() - saving
        state.stopped_early = bool(cfg.train.patience and state.bad_evals >= cfg.train.patience)
        state.out_of_time = bool(cfg.train.max_hours and state.spent_hours() >= cfg.train.max_hours)
        state.finished = state.stopped_early or state.out_of_time or state.step >= cfg.train.max_steps
        record({"step": state.step, **{k: round(v, 4) for k, v in scores.items()},
                "best_dev_bleu": state.best_bleu, "train_seconds": round(state.train_seconds, 1)})
        from tqdm import tqdm

        tqdm.write(f"step {state.step}: dev loss {scores['dev_loss']:.3f}, dev BLEU {scores['dev_bleu']:.2f}"
                   f"{' (best)' if improved else ''}")
        if _stopped_by(cfg, state) == "max_hours":
            tqdm.write(f"stopping: the time budget is spent ({state.spent_hours():.2f} hours, train.max_hours="
                       f"{cfg.train.max_hours:g}); the best model is that of update {state.best_step}")
    rng_states = gather_object([rng_state()])  # every process's generators, for an exact resume
    if accelerator.is_main_process:
        saving = time.perf_counter()
        save_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler, stream, state, rng_states)
        state.saving_seconds += time.perf_counter() - saving  # (this checkpoint's own time is not in it)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:  # every process needs the same early-stopping decision
        from accelerate.utils import broadcast_object_list

        state.load_state_dict(broadcast_object_list([state.state_dict()])[0])
    return time.perf_counter() - start
