"""Training configuration: pydantic schemas, YAML loading and ``--set KEY=VALUE`` overrides.

Every key is documented here; unknown keys are errors. A config file looks like::

    data_dir: runs/data          # made by `combinekd prepare`
    output_dir: runs/teacher     # becomes a Hugging Face model dir
    seed: 1
    model: {encoder_layers: 6, decoder_layers: 6, d_model: 512, ffn_dim: 2048, heads: 8}
    train: {max_steps: 20000, max_tokens: 4096, lr: 0.0007, warmup_steps: 4000}
    distill:                      # optional: train a student against a frozen teacher
      teacher: runs/teacher
      encoder: {strategy: overlap, combiner: linear}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from combinekd.errors import UserError

STRATEGIES = ("skip", "regular", "overlap", "skip-middle", "cross", "groups", "all", "random")
COMBINERS = ("linear", "student-up", "attention", "mean")
LAYER_LOSSES = ("mse", "normalized-mse", "cosine")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


ARCHITECTURES = ("pre-ln", "post-ln")


class ModelConfig(_Strict):
    """Transformer shape, tied and shared embeddings, sinusoidal positions.

    ``arch``: ``pre-ln`` (layer norm before each sub-layer plus a final one; transformers' Pegasus
    classes) trains deep models stably at a high learning rate with a short warm-up; ``post-ln``
    (transformers' Marian classes, the original Transformer and the paper's) needs a lower rate and
    a longer warm-up when deep. Both load in ``pipeline("translation")`` and convert to CTranslate2."""

    arch: Literal[ARCHITECTURES] = "pre-ln"  # type: ignore[valid-type]
    encoder_layers: int = Field(6, ge=1)
    decoder_layers: int = Field(6, ge=1)
    d_model: int = Field(512, ge=8)
    ffn_dim: int = Field(2048, ge=8)
    heads: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=8, description="longest sequence (positions) the model handles")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


class TrainConfig(_Strict):
    """Optimisation, batching, validation and checkpointing."""

    max_steps: int = Field(10000, ge=1, description="optimizer updates")
    max_tokens: int = Field(4096, ge=16, description="padded tokens per batch and side")
    lr: float = Field(7e-4, gt=0)
    warmup_steps: int = Field(4000, ge=0, description="linear warm-up, then inverse square root")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip_norm: float = Field(1.0, ge=0.0, description="0 disables gradient clipping")
    bf16: bool = Field(True, description="bf16 autocast (CPU with AMX, or GPU)")
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(1000, ge=1, description="validate and checkpoint every N updates")
    eval_beam: int = Field(1, ge=1, description="beam size for the dev BLEU during training")
    eval_max_sentences: int = Field(0, ge=0, description="0 = the whole dev set")
    patience: int = Field(0, ge=0, description="stop after N evaluations without a better dev BLEU; 0 = never")
    log_every: int = Field(50, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="an update whose loss is not finite (NaN/inf) is skipped "
                               "and logged; the run stops after this many in a row")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class SideConfig(_Strict):
    """Intermediate-layer KD for one side (encoder or decoder).

    ``strategy`` picks the teacher-layer groups M(i) for each student layer i (see mapping.py);
    ``combiner`` turns a group into one target (see combiners.py); ``loss`` compares them
    (default: ``normalized-mse`` for ``student-up``, as in the authors' code, else ``mse``)."""

    strategy: Literal[STRATEGIES] = "overlap"  # type: ignore[valid-type]
    groups: list[list[int]] | None = Field(None, description="1-based teacher layers per student layer")
    combiner: Literal[COMBINERS] = "linear"  # type: ignore[valid-type]
    loss: Literal[LAYER_LOSSES] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _groups_iff_strategy(self) -> SideConfig:
        if (self.strategy == "groups") != (self.groups is not None):
            raise ValueError("give `groups` exactly when strategy is `groups`")
        if self.loss is None:
            self.loss = "normalized-mse" if self.combiner == "student-up" else "mse"
        return self


class InitConfig(_Strict):
    """Copy embeddings and chosen teacher layers (1-based) into the student before training."""

    encoder: list[int] | None = None
    decoder: list[int] | None = None


class DistillConfig(_Strict):
    """Knowledge distillation from a frozen teacher (paper defaults: encoder-side layer KD only)."""

    teacher: Path
    w_hard: float = Field(0.1, ge=0.0, description="label-smoothed cross-entropy with the gold targets")
    w_soft: float = Field(0.2, ge=0.0, description="word-level KD: T^2 * KL(teacher || student)")
    w_layer: float = Field(0.7, ge=0.0, description="intermediate-layer (PKD / CKD) loss")
    w_attn: float = Field(0.0, ge=0.0, description="attention-map loss on the mapped layers")
    temperature: float = Field(1.0, gt=0.0)
    teacher_bf16: bool = Field(True, description="hold the frozen teacher in bf16 (CPU with AMX, or GPU)")
    encoder: SideConfig | None = Field(default_factory=SideConfig)
    decoder: SideConfig | None = None
    init_from_teacher: InitConfig | None = None


class Config(_Strict):
    """One training run: data, output, model shape, optimisation and optional distillation."""

    data_dir: Path
    output_dir: Path
    seed: int = 1
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig | None = None


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: `{part}` is not a section")
        node = child
    node[leaf] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config (or start from ``base``), apply ``KEY=VALUE`` overrides, validate."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of keys")
        tree.update(loaded or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got `{item}`")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"bad config{f' {path}' if path else ''}: {_describe(exc)}") from None


def dump_config(config: Config) -> str:
    """The validated config as YAML (saved with every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
