"""Decoding engines behind one interface: a Hugging Face model dir (PyTorch ``generate``) or a
CTranslate2 dir written by ``combinekd export``. :func:`load_translator` picks by the dir's content."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from combinekd.errors import UserError, warn

EXPORT_INFO = "combinekd_export.json"
# CTranslate2's beam search stops once `beam` hypotheses have ended (patience 1); transformers' (no
# early stopping) goes on while a running hypothesis can still win after length normalisation, and
# finds longer translations. Patience 2 lets CTranslate2 search on as well: on the tiny test model at
# beam 2 its BLEU went from 4 below transformers' to equal.
BEAM_PATIENCE = 2


def is_ct2_dir(path: str | Path) -> bool:
    """A CTranslate2 model dir: ``model.bin`` and our export record, or ``model.bin`` without HF weights."""
    path = Path(path)
    if not (path / "model.bin").is_file():
        return False
    return (path / EXPORT_INFO).is_file() or not (path / "model.safetensors").is_file()


def check_translator_dir(path: str | Path) -> None:
    """Refuse a path that is neither a Hugging Face model dir nor a CTranslate2 dir."""
    if is_ct2_dir(path):
        return
    from combinekd.models import check_model_dir

    check_model_dir(path)


def _size_on_disk(path: Path) -> int:
    """Bytes of a file, or of the files in a dir (staging leftovers excluded)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


# precisions for decoding with transformers (--dtype); CTranslate2 models keep their export's
DTYPES = ("float32", "bfloat16", "float16")


class HFTranslator:
    """transformers' ``generate`` on a Hugging Face model dir, on the GPU when there is one, with the
    weights in ``dtype`` (bfloat16: measured 1.6-2.0x faster than float32 on a CPU with AMX)."""

    engine = "transformers"

    def __init__(self, path: str | Path, dtype: str = "float32"):
        import torch

        from combinekd.models import count_parameters, default_device, input_limit, load_model_dir

        self.path = Path(path)
        self.precision = dtype
        self.model, self.tokenizer = load_model_dir(path)
        self.model.to(device=default_device(), dtype=getattr(torch, dtype))
        self.params = count_parameters(self.model)
        self.max_positions = input_limit(self.model, self.tokenizer)  # None: no limit (T5)
        self.size = _size_on_disk(self.path / "model.safetensors") if (self.path / "model.safetensors").is_file() \
            else _size_on_disk(self.path)

    def translate(self, sentences: Sequence[str], beam: int = 5, batch_size: int = 32,
                  progress: bool = False) -> list[str]:
        from combinekd.evaluate import translate

        return translate(self.model, self.tokenizer, sentences, beam=beam, batch_size=batch_size, progress=progress)

    def too_long(self, sentences: Sequence[str]) -> list[tuple[int, int]]:
        from combinekd.evaluate import too_long

        return too_long(self.model, self.tokenizer, sentences)


def ct2_threads() -> tuple[int, int]:
    """``(inter_threads, intra_threads)`` for CTranslate2 on the CPU: one single-threaded translator per
    core (``OMP_NUM_THREADS`` or the usable CPUs), fed whole batches in parallel.

    Measured on 2 cores shared with a training job (tiny int8 test model, 600 sentences, beam 5,
    sentences/s through this class / one translate_batch call): batch 32: inter 2 + intra 1 1203 / 1844,
    inter 1 + intra 1 1167 / 1986, inter 1 + intra 2 659 / 899; batch 1: 742 / 1081, 765 / 1097, 80 / 88.
    Splitting one batch's matrix products over cores does not pay for small models (intra 2 was the
    slowest by 2x or more); running batches side by side costs nothing and uses free cores."""
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    return max(1, cores), 1


class CT2Translator:
    """A CTranslate2 ``Translator`` on a dir written by ``combinekd export`` (tokenizer files inside)."""

    engine = "ctranslate2"

    def __init__(self, path: str | Path, inter_threads: int | None = None, intra_threads: int | None = None):
        import ctranslate2

        from combinekd.data import load_tokenizer

        self.path = Path(path)
        self.tokenizer = load_tokenizer(self.path)
        info_path = self.path / EXPORT_INFO
        self.info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        inter, intra = ct2_threads()
        try:
            self.translator = ctranslate2.Translator(
                str(self.path), device="cuda" if ctranslate2.get_cuda_device_count() else "cpu",
                inter_threads=inter_threads or inter, intra_threads=intra_threads or intra)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"cannot load the CTranslate2 model in {self.path}: {str(exc).splitlines()[0]}") from None
        self.params = int(self.info.get("params") or 0)
        self.precision = self.info.get("quantization", "float32")
        self.max_positions = self.info.get("max_positions")
        self.size = _size_on_disk(self.path / "model.bin")
        # Marian's converter drops <pad> from the vocabulary; Pegasus keeps it, and HF generate bans it
        self._suppress = None if self.info.get("model_type") == "marian" else [[self.tokenizer.pad_token]]

    def too_long(self, sentences: Sequence[str]) -> list[tuple[int, int]]:
        from combinekd.evaluate import longer_than

        return longer_than(self.tokenizer, sentences, self.max_positions)

    def translate(self, sentences: Sequence[str], beam: int = 5, batch_size: int = 32,
                  progress: bool = False) -> list[str]:
        """Length-sorted batches, the same length bound and pad suppression as the HF path."""
        from tqdm import tqdm

        from combinekd.evaluate import decoding_length

        tok = self.tokenizer
        limit = self.max_positions or tok.model_max_length
        order = sorted((i for i, s in enumerate(sentences) if s.strip()), key=lambda i: len(sentences[i]))
        hyps: list[str] = [""] * len(sentences)
        pending = []  # every batch is submitted at once: the translator's inter threads decode them side by side
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids = tok([sentences[i] for i in chunk], truncation=True, max_length=limit)["input_ids"]
            tokens = [tok.convert_ids_to_tokens(x) for x in ids]
            pending.append((chunk, self.translator.translate_batch(
                tokens, beam_size=beam, max_batch_size=batch_size, patience=BEAM_PATIENCE, asynchronous=True,
                max_decoding_length=decoding_length(max(len(x) for x in ids), limit),
                max_input_length=limit, suppress_sequences=self._suppress, return_scores=False)))
        for chunk, results in tqdm(pending, disable=not progress, desc="translate", leave=False):
            for i, result in zip(chunk, results):
                out = tok.convert_tokens_to_ids(result.result().hypotheses[0])
                hyps[i] = tok.decode(out, skip_special_tokens=True).strip()
        return hyps


def warn_slow_dtype(dtype: str) -> None:
    """One warning line when ``--dtype bfloat16`` is likely slower than float32 here (models.slow_bf16_warning)."""
    from combinekd.models import default_device, slow_bf16_warning

    if dtype == "bfloat16" and (why := slow_bf16_warning(default_device())):
        warn(f"--dtype bfloat16, but {why}: consider --dtype float32")


def load_translator(path: str | Path, dtype: str = "float32"):
    """The engine for ``path``: :class:`CT2Translator` for a CTranslate2 dir, else :class:`HFTranslator`
    with its weights in ``dtype`` (a CTranslate2 model's precision was fixed by its export)."""
    check_translator_dir(path)
    if not is_ct2_dir(path):
        warn_slow_dtype(dtype)
        return HFTranslator(path, dtype)
    if dtype != "float32":
        raise UserError(f"{path} is a CTranslate2 model: its precision was chosen when it was exported "
                        "(`combinekd export --quantization`), not with --dtype")
    return CT2Translator(path)
