"""``combinekd export``: a model dir to a CTranslate2 dir, with ctranslate2's own converter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from combinekd import __version__
from combinekd.engines import EXPORT_INFO, is_ct2_dir
from combinekd.errors import UserError
from combinekd.files import atomic_dir

QUANTIZATIONS = ("int8", "int8_float32", "int16", "float16", "float32")
SUPPORTED = ("marian", "pegasus")  # the model types combinekd builds (and OPUS-MT's)
# what the tokenizer needs to load from the exported dir (MarianTokenizer, or a fast tokenizer)
TOKENIZER_COPY = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.json", "sentencepiece.bpe.model",
                  "spiece.model")


def _hf_config(model_dir: Path) -> dict:
    if is_ct2_dir(model_dir):
        raise UserError(f"{model_dir} is already a CTranslate2 dir: export the Hugging Face model it came from")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"no model found at {model_dir} (expected a Hugging Face seq2seq model dir with config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(config, dict) or not config.get("is_encoder_decoder") \
            or config.get("model_type") not in SUPPORTED:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"{model_dir} is not a seq2seq translation model combinekd can export "
                        f"(model_type {kind!r}; expected one of {', '.join(SUPPORTED)})")
    if not (model_dir / "model.safetensors").is_file():
        raise UserError(f"no weights in {model_dir} (expected model.safetensors)")
    return config


def _count_parameters(weights: Path) -> int:
    """Parameters in a safetensors file as models.count_parameters counts them: tied weights are stored
    once; ``final_logits_bias`` is a buffer, not a parameter."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights), framework="pt") as handle:
        for name in handle.keys():
            if name.endswith("final_logits_bias"):
                continue
            shape = handle.get_slice(name).get_shape()
            count = 1
            for dim in shape:
                count *= dim
            total += count
    return total


def _check_zero_start_embedding(model_dir: Path, config: dict) -> None:
    """ctranslate2 starts a Marian decoder from a zero embedding, where transformers embeds the pad token:
    the same only while the pad row is zero (as combinekd initialises it and training keeps it)."""
    from safetensors import safe_open

    from combinekd.errors import warn

    pad = config.get("decoder_start_token_id", config.get("pad_token_id"))
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        name = next((k for k in handle.keys()
                     if k.endswith("shared.weight") or k.endswith("decoder.embed_tokens.weight")), None)
        if name is None or pad is None:
            return
        row = handle.get_slice(name)[pad:pad + 1]
    if float(row.abs().max()) > 0:
        warn(f"{model_dir}: the decoder start (pad) embedding is not zero, but CTranslate2 starts Marian "
             f"decoders from zeros: the export's translations may differ from the original's")


def _converter_view(model_dir: Path, config: dict, where: Path) -> Path:
    """The dir the converter reads: ``model_dir`` itself, or for Pegasus a view of it (symlinks) whose
    config.json adds the two flags ctranslate2's Pegasus loader reads but transformers' PegasusConfig
    no longer has (``normalize_before``: pre-LN; no embedding layer norm)."""
    if config["model_type"] != "pegasus" or "normalize_before" in config:
        return model_dir
    where.mkdir()
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            os.symlink(item.resolve(), where / item.name)
    (where / "config.json").write_text(json.dumps({**config, "normalize_before": True,
                                                   "normalize_embedding": False}), encoding="utf-8")
    return where


def export_model(model_dir: str | Path, out: str | Path, quantization: str = "int8",
                 overwrite: bool = False) -> dict:
    """Convert ``model_dir`` to a CTranslate2 dir ``out`` (written atomically) with its tokenizer files,
    ``combinekd_export.json`` and a model card; returns the export record."""
    from combinekd.data import load_tokenizer
    from combinekd.evaluate import recorded_languages

    model_dir, out = Path(model_dir), Path(out)
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r} (expected one of {', '.join(QUANTIZATIONS)})")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists: add --overwrite to replace it, or choose another directory")
    if out.resolve() == model_dir.resolve():
        raise UserError("--out must differ from MODEL_DIR")
    config = _hf_config(model_dir)
    load_tokenizer(model_dir)  # a dir without a tokenizer fails here, before converting
    from ctranslate2.converters import TransformersConverter

    from combinekd.models import _quiet_transformers

    _quiet_transformers()
    languages = recorded_languages(model_dir)
    info = {"source_model": str(model_dir.resolve()), "quantization": quantization,
            "source_lang": languages[0] if languages else None, "target_lang": languages[1] if languages else None,
            "model_type": config["model_type"], "params": _count_parameters(model_dir / "model.safetensors"),
            "max_positions": config.get("max_position_embeddings"), "combinekd_version": __version__}
    if config["model_type"] == "marian":
        _check_zero_start_embedding(model_dir, config)
    with tempfile.TemporaryDirectory(prefix=".combinekd-export-") as scratch, atomic_dir(out) as staged:
        source = _converter_view(model_dir, config, Path(scratch) / "view")
        try:
            TransformersConverter(str(source)).convert(str(staged), quantization=quantization, force=True)
        except (NotImplementedError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
            raise UserError(f"ctranslate2 cannot convert {model_dir}: {str(exc).splitlines()[0]}") from None
        for name in TOKENIZER_COPY:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staged / name)
        (staged / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        from combinekd.card import write_export_card

        write_export_card(staged, model_dir, info, name=out.name)
    return info
