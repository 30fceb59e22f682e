"""Checkpoint averaging: a model whose weights are the element-wise mean of a run's last evaluated
models, theta = (1/N) sum_k theta_k (as fairseq's ``average_checkpoints.py``; Vaswani et al. averaged
the last 5-20 checkpoints). A cheap ensemble: one model's size and speed, often a few tenths of BLEU
better than the best single model, especially where a model over-fits a small corpus. Choose between
the average and the best model on dev.

During training the student's weights after each of the last ``train.keep_models`` evaluations are
kept as ``OUTPUT_DIR/checkpoints/models/step-NNNNNNNN.safetensors``; ``combinekd average`` writes the
mean of (the last N of) them as a normal model dir.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from combinekd.card import AVERAGE_INFO, log_entries, write_train_card
from combinekd.errors import UserError
from combinekd.files import atomic_dir, atomic_file, staged_pattern

MODELS = Path("checkpoints") / "models"
_NAME = re.compile(r"step-(\d+)\.safetensors")


def keep_model(model: torch.nn.Module, run_dir: str | Path, step: int, keep: int) -> None:
    """Save ``model``'s weights as evaluated at update ``step`` and delete all but the last ``keep``, and
    any file a run killed while writing one left behind (the caller holds the run's lock)."""
    if keep <= 0:
        return
    models = Path(run_dir) / MODELS
    with atomic_file(models / f"step-{step:08d}.safetensors") as staged:
        save_model(model, str(staged))
    for _, old in kept_models(run_dir)[:-keep]:
        old.unlink()
    for leftover in models.glob(staged_pattern("step-*.safetensors")):
        leftover.unlink(missing_ok=True)


def kept_models(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(update, file)`` of the models a run kept, oldest first."""
    models = Path(run_dir) / MODELS
    found = [(int(m.group(1)), p) for p in models.glob("step-*.safetensors") if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def average_models(run_dir: str | Path, out: str | Path, last: int | None = None, overwrite: bool = False) -> dict:
    """Write to ``out`` the mean of the last ``last`` (default: all) models kept by the run in ``run_dir``,
    with the run's tokenizer, config and a model card; returns the ``averaged.json`` record."""
    from combinekd.models import load_model_dir, save_model_dir

    run_dir, out = Path(run_dir), Path(out)
    kept = kept_models(run_dir)
    if not kept:
        raise UserError(f"{run_dir} kept no models to average (none in {run_dir / MODELS}): train it with "
                        f"train.keep_models > 0 (default 6)")
    if last is not None and last > len(kept):
        raise UserError(f"--last {last}: {run_dir} kept only {len(kept)} models (updates "
                        f"{', '.join(str(s) for s, _ in kept)})")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists: add --overwrite to replace it, or choose another directory")
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must differ from RUN_DIR")
    chosen = kept[-last:] if last else kept
    model, tokenizer = load_model_dir(run_dir)  # the run's architecture and tokenizer
    first = load_file(str(chosen[0][1]))
    mean = {name: value.double() for name, value in first.items()}  # summed in fp64, then cast back
    for _, path in chosen[1:]:
        tensors = load_file(str(path))
        if tensors.keys() != mean.keys():
            raise UserError(f"{path} holds other weights than {chosen[0][1]}: not the same model")
        for name, value in tensors.items():
            mean[name] += value.double()
    mean = {name: (value / len(chosen)).to(first[name].dtype) for name, value in mean.items()}
    with tempfile.TemporaryDirectory(prefix=".combinekd-average-") as scratch:
        save_file(mean, f"{scratch}/mean.safetensors")
        try:
            load_model(model, f"{scratch}/mean.safetensors")  # strict: every weight, tied ones once
        except RuntimeError as exc:
            raise UserError(f"the kept models of {run_dir} do not fit its model dir: "
                            f"{str(exc).splitlines()[0]}") from None
    dev = _dev_bleu(run_dir)
    info = {"source_run": str(run_dir.resolve()), "steps": [s for s, _ in chosen],
            "dev_bleu_during_training": {str(s): dev.get(s) for s, _ in chosen}}
    with atomic_dir(out) as staged:
        save_model_dir(model, tokenizer, staged)
        for name in ("train_config.yaml", "train_summary.json", "train_log.jsonl"):  # how it was trained (card)
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staged / name)
        (staged / AVERAGE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        write_train_card(staged, name=out.name)
    return info


def _dev_bleu(run_dir: Path) -> dict[int, float]:
    """Dev BLEU by update, from the run's train_log.jsonl."""
    return {int(entry["step"]): entry["dev_bleu"] for entry in log_entries(run_dir) if "dev_bleu" in entry}
