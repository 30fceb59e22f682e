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

import copy
import difflib
import json
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from combinekd.errors import UserError

STRATEGIES = ("skip", "regular", "overlap", "skip-middle", "cross", "groups", "all", "random")
COMBINERS = ("linear", "student-up", "attention", "mean")
LAYER_LOSSES = ("mse", "normalized-mse", "cosine")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``max_steps: 1e5`` (YAML reads ``1e5`` as a string) or ``4000.0`` is 100000 / 4000 for a
        whole-number key; a fraction stays an error."""
        if cls.model_fields[info.field_name].annotation is int and isinstance(value, (str, float)):
            try:
                number = float(value)
            except ValueError:
                return value
            if number.is_integer():
                return int(number)
        return value


ARCHITECTURES = ("pre-ln", "post-ln")


class ModelConfig(_Strict):
    """Transformer shape, tied and shared embeddings, sinusoidal positions.

    ``arch``: ``pre-ln`` (layer norm before each sub-layer plus a final one; transformers' Pegasus
    classes) trains deep models stably at a high learning rate with a short warm-up; ``post-ln``
    (transformers' Marian classes, the original Transformer and the paper's) needs a lower rate and
    a longer warm-up when deep. Both load with transformers' Auto classes (and in
    ``pipeline("translation")`` on transformers 4.x) and convert to CTranslate2."""

    arch: Literal[ARCHITECTURES] = Field(  # type: ignore[valid-type]
        "pre-ln", description="pre-ln: trains deep models stably; post-ln: Marian, the original Transformer")
    encoder_layers: int = Field(6, ge=1, description="encoder layers")
    decoder_layers: int = Field(6, ge=1, description="decoder layers")
    d_model: int = Field(512, ge=8, description="model width (embedding size)")
    ffn_dim: int = Field(2048, ge=8, description="feed-forward inner width")
    heads: int = Field(8, ge=1, description="attention heads; must divide d_model")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after attention, feed-forward and embeddings")
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the attention weights")
    activation_dropout: float = Field(0.0, ge=0.0, lt=1.0,
                                      description="dropout after the feed-forward activation (inside the ffn)")
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
    lr: float = Field(7e-4, gt=0, description="peak learning rate (AdamW, betas 0.9/0.98)")
    warmup_steps: int = Field(4000, ge=0, description="linear warm-up, then train.schedule")
    schedule: Literal["inverse-sqrt", "linear"] = Field(
        "inverse-sqrt", description="the learning rate after the warm-up: inverse-sqrt (lr * sqrt(warmup/step), "
        "open-ended: raising max_steps trains on) or linear (down to zero at max_steps: a fixed budget, e.g. a few "
        "hours on a CPU; max_steps can then not be changed on resume)")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing of the cross-entropy")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    clip_norm: float = Field(1.0, ge=0.0, description="0 disables gradient clipping")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast; auto: on where bf16 is native (a GPU that supports it, an x86 CPU with "
        "AMX or AVX-512 BF16), off elsewhere (emulated there, and can be many times slower than fp32)")
    compile_loss: bool | Literal["auto"] = Field(
        "auto", description="run the loss's elementwise work (the per-chunk softmaxes of the hard and soft terms "
        "and their gradient; the combiners and the layer loss) as torch.compile's fused loops; auto: on a CPU "
        "(measured: README, Speed), off on a GPU (not measured there). Compiled once per run, a few seconds; where "
        "it cannot be built (no C++ compiler) it warns and runs eagerly")
    grad_accum: int = Field(1, ge=1, description="batches accumulated per optimizer update")
    eval_every: int = Field(1000, ge=1, description="validate and checkpoint every N updates")
    eval_beam: int = Field(1, ge=1, description="beam size for the dev BLEU during training")
    eval_max_sentences: int = Field(0, ge=0, description="0 = the whole dev set")
    eval_batch_size: int = Field(32, ge=1, description="sentences per decoding batch for the dev BLEU "
                                 "(larger is faster on a GPU)")
    patience: int = Field(0, ge=0, description="stop after N evaluations in a row that improved nothing "
                          "(see patience_on); 0 = never")
    patience_on: Literal["bleu-or-loss", "bleu"] = Field(
        "bleu-or-loss", description="what counts as an improvement for patience: a better dev BLEU or a dev loss "
        "at least 0.1% below the lowest so far (bleu-or-loss), or a better dev BLEU only (bleu). The best model is "
        "always the one with the best dev BLEU")
    max_hours: float = Field(0.0, ge=0.0, description="time budget: stop at the first evaluation after the run has "
                             "spent this many hours training, validating and saving (summed over resumed sessions); "
                             "its best model so far is the result, and resuming with a larger budget trains on; "
                             "0 = no limit")
    keep_models: int = Field(6, ge=0, description="keep the weights of the last N evaluated models (in "
                             "OUTPUT_DIR/checkpoints/models) for `combinekd average`; 0 = none (the best model is kept "
                             "apart, in OUTPUT_DIR itself)")
    log_every: int = Field(50, ge=1, description="log losses and speed every N updates")
    max_bad_steps: int = Field(5, ge=1, description="an update whose loss is not finite (NaN/inf) is skipped "
                               "and logged; the run stops after this many in a row")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")


class SideConfig(_Strict):
    """Intermediate-layer KD for one side (encoder or decoder).

    ``strategy`` picks the teacher-layer groups M(i) for each student layer i (see mapping.py);
    ``combiner`` turns a group into one target (see combiners.py); ``loss`` compares them
    (default: ``normalized-mse`` for ``student-up``, as in the authors' code, else ``mse``)."""

    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "overlap", description="teacher-layer groups (`combinekd mapping`)")
    groups: list[list[int]] | None = Field(None, description="1-based teacher layers per student layer")
    combiner: Literal[COMBINERS] = Field(  # type: ignore[valid-type]
        "linear", description="how a group becomes one target")
    loss: Literal[LAYER_LOSSES] | None = Field(  # type: ignore[valid-type]
        None, description="layer loss; null: normalized-mse for student-up, else mse")

    @model_validator(mode="after")
    def _groups_iff_strategy(self) -> SideConfig:
        if (self.strategy == "groups") != (self.groups is not None):
            raise ValueError("give `groups` exactly when strategy is `groups`")
        if self.loss is None:
            self.loss = "normalized-mse" if self.combiner == "student-up" else "mse"
        return self


class InitConfig(_Strict):
    """Copy embeddings and chosen teacher layers (1-based) into the student before training."""

    encoder: list[int] | None = Field(None, description="teacher encoder layers to copy, one per student layer")
    decoder: list[int] | None = Field(None, description="teacher decoder layers to copy, one per student layer")


WEIGHT_PRESETS: dict[str, dict[str, float]] = {
    # Wu et al. (2020); the default: best on dev of four weightings for the CPU student distilled from a
    # converged teacher (README, "How the default weights were chosen")
    "paper": {"w_hard": 0.1, "w_soft": 0.2, "w_layer": 0.7},
    # gold-heavy: ahead in 200-update runs from a weak teacher (the default until 2026-12-05; `make demo`)
    "combinekd": {"w_hard": 0.5, "w_soft": 0.5, "w_layer": 1.0},
}


class DistillConfig(_Strict):
    """Knowledge distillation from a frozen teacher (paper defaults: encoder-side layer KD only).

    ``weights`` names a preset for ``w_hard``/``w_soft``/``w_layer``; a weight given explicitly wins."""

    teacher: Path = Field(description="the teacher (a local Hugging Face seq2seq model dir); required in distill")
    weights: Literal[tuple(WEIGHT_PRESETS)] = Field(  # type: ignore[valid-type]
        "paper", description="preset for w_hard/w_soft/w_layer: paper (default) or combinekd")
    w_hard: float | None = Field(None, ge=0.0, description="label-smoothed cross-entropy with the gold targets "
                                                          "(null: from the preset)")
    w_soft: float | None = Field(None, ge=0.0, description="word-level KD: T^2 * KL(teacher || student) "
                                                          "(null: from the preset)")
    w_layer: float | None = Field(None, ge=0.0, description="intermediate-layer (PKD / CKD) loss (null: from the preset)")
    w_attn: float = Field(0.0, ge=0.0, description="attention-map loss on the mapped layers")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature T of the word-level KD")
    teacher_bf16: bool | Literal["auto"] = Field(
        "auto", description="hold the frozen teacher in bf16; auto: where bf16 is native, as train.bf16")
    encoder: SideConfig | None = Field(default_factory=SideConfig, description="encoder-side layer KD; null: none")
    decoder: SideConfig | None = Field(None, description="decoder-side layer KD; null: none")
    init_from_teacher: InitConfig | None = Field(None, description="copy teacher layers into the student first")

    @model_validator(mode="after")
    def _weights_from_preset(self) -> DistillConfig:
        for key, value in WEIGHT_PRESETS[self.weights].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self


class Config(_Strict):
    """One training run: data, output, model shape, optimisation and optional distillation."""

    data_dir: Path = Field(description="prepared data (made by `combinekd prepare`)")
    output_dir: Path = Field(description="the run: a Hugging Face model dir, checkpoints and logs")
    seed: int = Field(1, description="random seed (initialisation, dropout, batch order)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model trained")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation and validation")
    distill: DistillConfig | None = Field(None, description="distillation from a teacher; null: none")


def _merge(tree: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep-merge ``update`` into ``tree``: a section given as a mapping changes only the keys it names."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)


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
    _merge(node, {leaf: value})


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config class of a section (``ModelConfig``, ``SideConfig | None``, ...), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _suggestion(loc: tuple) -> str:
    """``; did you mean `encoder_layers`?`` for a mistyped key at ``loc``, or nothing."""
    section: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = section.model_fields.get(part) if section and isinstance(part, str) else None
        section = _section(field.annotation) if field else None
    if section is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _suggestion(item["loc"])
        else:
            message = item["msg"]
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML config (or start from ``base``), apply ``KEY=VALUE`` overrides, validate."""
    tree: dict[str, Any] = copy.deepcopy(base or {})  # the caller's dicts are never modified
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
        _merge(tree, loaded or {})
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


def _default_text(field) -> str:
    """A field's default as YAML would write it; ``required`` when it has none."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "{...}"
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value) if value is None or isinstance(value, (bool, list)) else str(value)


def config_keys(section: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """Every config key as ``(dotted key, default, description)``, sections before their keys."""
    for name, field in (section or Config).model_fields.items():
        description = field.description or ""
        choices = [typing.get_args(a) for a in (field.annotation, *typing.get_args(field.annotation))
                   if typing.get_origin(a) is Literal]
        if choices:
            either = ("true", "false") if bool in typing.get_args(field.annotation) else ()
            description += f" (one of: {', '.join((*choices[0], *either))})"
        yield prefix + name, _default_text(field), description
        if sub := _section(field.annotation):
            yield from config_keys(sub, f"{prefix}{name}.")


def show_config() -> str:
    """``combinekd config --show``: one aligned line per key: key, default, description."""
    rows = list(config_keys())
    width_key = max(len(key) for key, _, _ in rows)
    width_default = max(len(default) for _, default, _ in rows)
    return "\n".join(f"{key:<{width_key}}  {default:<{width_default}}  {description}"
                     for key, default, description in rows)
