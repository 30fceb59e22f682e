"""Shared fixtures: a tiny synthetic translation task that a tiny model learns in a few hundred steps.

Task: "xx" sentences are random words w0..w15; the "yy" translation maps every word wK to vK and
keeps the order (a word-for-word dictionary task)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from combinekd.config import load_config

WORDS = 16


def synthetic_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        ids = [rng.randrange(WORDS) for _ in range(rng.randint(3, 8))]
        src.append(" ".join(f"w{i}" for i in ids))
        tgt.append(" ".join(f"v{i}" for i in ids))
    return src, tgt


def write_corpus(root: Path, sizes: dict[str, int] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for seed, (split, n) in enumerate((sizes or {"train": 3000, "dev": 60, "test": 60}).items()):
        src, tgt = synthetic_pairs(n, seed)
        (root / f"{split}.xx").write_text("\n".join(src) + "\n", encoding="utf-8")
        (root / f"{split}.yy").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return root


def prepare_corpus(corpus: Path, out: Path, **kwargs) -> Path:
    from combinekd.data import prepare

    prepare("xx", "yy", {s: str(corpus / s) for s in ("train", "dev", "test")}, out, vocab_size=48, **kwargs)
    return out


def tiny_config(data_dir: Path, output_dir: Path, **overrides) -> "Config":  # noqa: F821
    base = {
        "data_dir": str(data_dir), "output_dir": str(output_dir), "seed": 3,
        "model": {"encoder_layers": 2, "decoder_layers": 2, "d_model": 64, "ffn_dim": 128, "heads": 4,
                  "dropout": 0.1, "max_length": 64},
        "train": {"max_steps": 20, "max_tokens": 600, "lr": 1e-3, "warmup_steps": 100, "eval_every": 10,
                  "log_every": 5, "bf16": False, "threads": 1},
    }
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets, base=base)


def save_random_model(data_dir: Path, path: Path, seed: int, **shape) -> Path:
    """A randomly initialised combinekd model of the given shape, saved with the data's tokenizer."""
    from combinekd.config import ModelConfig
    from combinekd.data import load_tokenizer
    from combinekd.models import build_model, save_model_dir

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(data_dir)
    save_model_dir(build_model(ModelConfig(max_length=64, **shape), tokenizer), tokenizer, path)
    return path


def has_translation_pipeline() -> bool:
    """transformers 5 removed pipeline("translation"); the pinned 4.57.6 has it, so its tests run there."""
    from transformers.pipelines import SUPPORTED_TASKS

    return "translation" in SUPPORTED_TASKS


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(corpus, tmp_path_factory) -> Path:
    return prepare_corpus(corpus, tmp_path_factory.mktemp("prep") / "data")


@pytest.fixture(scope="session")
def trained_model(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny model trained on the synthetic task (about a minute on 2 cores)."""
    from combinekd.trainer import train

    out = tmp_path_factory.mktemp("teacher") / "model"
    torch.manual_seed(0)
    summary = train(tiny_config(data_dir, out, **{"train.max_steps": 400, "train.eval_every": 100}))
    return out, summary
