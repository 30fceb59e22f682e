"""Decoding (transformers' generate), sacreBLEU BLEU/chrF with signatures, multi-reference scoring
and paired bootstrap resampling between two systems."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.generation.utils import ALL_CACHE_NAMES

from combinekd.card import record_evaluation
from combinekd.data import check_writable, read_lines, read_meta, split_text
from combinekd.errors import UserError, warn
from combinekd.files import atomic_file


@torch.no_grad()
def translate(model, tokenizer, sentences: Sequence[str], beam: int = 5, batch_size: int = 32,
              progress: bool = False) -> list[str]:
    """Translate sentences in length-sorted batches; returns detokenized hypotheses in input order.

    An empty (or blank) sentence gives an empty hypothesis. Inputs longer than the model reads
    (its positions; T5: its tokenizer's limit, if any) are cut to fit (see :func:`too_long`)."""
    from tqdm import tqdm

    from combinekd.models import input_limit

    was_training = model.training
    model.eval()
    limit = input_limit(model, tokenizer)
    order = sorted((i for i, s in enumerate(sentences) if s.strip()), key=lambda i: len(sentences[i]))
    hyps: list[str] = [""] * len(sentences)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="translate", leave=False):
        chunk = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in chunk], return_tensors="pt", padding=True,
                        truncation=limit is not None, max_length=limit).to(model.device)
        new_tokens = decoding_length(enc["input_ids"].shape[1], limit)
        out = model.generate(**enc, num_beams=beam, max_length=new_tokens + 1, do_sample=False,
                             **beam_search_cache(model, beam))
        for i, text in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
            hyps[i] = text.strip()
    model.train(was_training)
    return hyps


class SharedSourceCache(EncoderDecoderCache):
    """transformers' encoder-decoder cache, less one copy per step. After every step of beam search
    ``generate`` reorders each layer's cached keys and values by the beams that survive; those indices
    stay within each sentence's beams, and all beams of a sentence attend over the same source, so the
    cross-attention rows of one sentence are equal and reordering them changes nothing. Only the
    self-attention cache is reordered. Same output (every token of 400 pt-en test sentences); beam 5,
    batch 32, 2 CPU threads: 2+2 d256 25.9-26.1 -> 29.1-29.7 sentences/s, 6+6 d256 12.2-14.2 -> 14.7
    (results/speed-2026-11-28f.md)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def beam_search_cache(model, beam: int) -> dict:
    """``generate``'s cache argument for one beam search: a fresh :class:`SharedSourceCache` (none for
    greedy decoding, or for a model that reorders its cache with its own ``_reorder_cache``)."""
    if beam <= 1 or not model.config.is_encoder_decoder or hasattr(model, "_reorder_cache"):
        return {}
    return {ALL_CACHE_NAMES[0]: SharedSourceCache(DynamicCache(), DynamicCache())}  # 4.x past_key_values, 5.x cache


def decoding_length(source_tokens: int, limit: int | None) -> int:
    """The most target tokens decoded for a batch whose longest input has ``source_tokens`` tokens
    (both engines use it): 1.5 times the input plus 10, within the model's positions."""
    bound = int(source_tokens * 1.5) + 10
    return min(limit - 1, bound) if limit else bound


def too_long(model, tokenizer, sentences: Sequence[str]) -> list[tuple[int, int]]:
    """``(index, tokens)`` of each sentence longer than the model reads: :func:`translate` cuts those."""
    from combinekd.models import input_limit

    return longer_than(tokenizer, sentences, input_limit(model, tokenizer))


def longer_than(tokenizer, sentences: Sequence[str], limit: int | None) -> list[tuple[int, int]]:
    """``(index, tokens)`` of each sentence with more than ``limit`` tokens (none when there is no limit)."""
    if not limit or not sentences:
        return []
    lengths = [len(ids) for ids in tokenizer(list(sentences))["input_ids"]]
    return [(i, n) for i, n in enumerate(lengths) if n > limit]


def recorded_languages(directory: str | Path) -> tuple[str, str] | None:
    """The ``(source, target)`` languages the tokenizer in a model dir or DATADIR records, if any
    (Marian tokenizers, ours and OPUS-MT's, save ``source_lang``/``target_lang``)."""
    path = Path(directory)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    pair = config.get("source_lang"), config.get("target_lang")
    return pair if all(isinstance(lang, str) and lang for lang in pair) else None


def _same_languages(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Equal language pairs, ignoring case and region (``pt_BR`` is ``pt``)."""
    def base(lang: str) -> str:
        return lang.lower().replace("_", "-").split("-")[0]

    return all(base(x) == base(y) for x, y in zip(a, b))


def check_languages(model_dir: str | Path, data_dir: str | Path, meta: dict) -> None:
    """Refuse a model whose recorded direction is not the data's (as meta.json names it, or as the
    data's tokenizer records it: a teacher's tokenizer reused with ``--tokenizer-from``)."""
    model = recorded_languages(model_dir)
    named = (meta["src_lang"], meta["tgt_lang"])
    if model is None or any(data and _same_languages(model, data) for data in (named, recorded_languages(data_dir))):
        return
    raise UserError(f"{model_dir} translates {model[0]}->{model[1]} but {data_dir} holds {named[0]}->{named[1]}: "
                    "check the model and --data, or add --force if the languages are the same")


def hypotheses_path(model_dir: str | Path, split: str, meta: dict, out: str | Path | None = None) -> Path:
    """Where evaluate writes the hypotheses: ``out``, or MODEL_DIR/SPLIT.hyp.TGT."""
    return Path(out) if out else Path(model_dir) / f"{split}.hyp.{meta['tgt_lang']}"


def check_before_decoding(model_dir: str | Path, data_dir: str | Path, meta: dict, out: Path, force: bool) -> None:
    """Everything evaluate can refuse before it decodes: the model dir, its languages (unless
    ``force``) and the hypotheses file."""
    from combinekd.engines import check_translator_dir

    check_translator_dir(model_dir)
    if not force:
        check_languages(model_dir, data_dir, meta)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: give a file name")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} not found")
    check_writable(out)


def corpus_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
    """sacreBLEU BLEU and chrF (default 13a tokenisation) with their signatures; refs = list of streams."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(list(hyps), [list(r) for r in refs]), chrf.corpus_score(list(hyps), [list(r) for r in refs])
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def paired_bootstrap(systems: dict[str, Sequence[str]], refs: Sequence[Sequence[str]], samples: int = 1000) -> dict:
    """sacreBLEU's paired bootstrap resampling; the first system is the baseline the others are tested against.

    Returns, per system, its BLEU, the bootstrap mean and 95% CI, and the p-value against the baseline."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    test = PairedTest([(name, list(h)) for name, h in systems.items()], {"BLEU": BLEU()},
                      references=[list(r) for r in refs], test_type="bs", n_samples=samples)
    _, scores = test()
    return {name: {"bleu": round(r.score, 2), "mean": r.mean, "ci": r.ci, "p_value": r.p_value}
            for name, r in zip(scores["System"], scores["BLEU"])}


def compare(model_dirs: Sequence[str | Path], data_dir: str | Path, split: str = "test", beam: int = 5,
            extra_refs: Sequence[str | Path] = (), batch_size: int = 32, limit: int | None = None,
            force: bool = False, dtype: str = "float32") -> list[dict]:
    """Evaluate several models on one split; BLEU significance of each against the first (paired bootstrap).
    ``dtype``: the precision of the Hugging Face models (CTranslate2 models keep their export's)."""
    from combinekd.engines import is_ct2_dir

    meta = read_meta(data_dir)
    for model_dir in model_dirs:  # every model, before the first one decodes
        check_before_decoding(model_dir, data_dir, meta, hypotheses_path(model_dir, split, meta), force)
    results = [evaluate(m, data_dir, split, beam, extra_refs, batch_size, limit=limit, force=force,
                        dtype="float32" if is_ct2_dir(m) else dtype) for m in model_dirs]
    refs = [split_text(data_dir, split)[1][:limit]] + [read_lines(p)[:limit] for p in extra_refs]
    systems = {f"#{i}": read_lines(r["hypotheses"]) for i, r in enumerate(results)}
    significance = paired_bootstrap(systems, refs) if len(systems) > 1 else {}
    for i, (model, result) in enumerate(zip(model_dirs, results)):
        result["model"] = str(model)
        if significance:
            result["bootstrap"] = significance[f"#{i}"]
    return results


def markdown_table(results: Sequence[dict]) -> str:
    """Model, parameters, BLEU (with bootstrap 95% CI and p-value vs the first row), chrF, decoding speed
    (and its ratio to the first row's), for one split, beam and thread count."""
    from combinekd.engines import ct2_threads

    rows = ["| model | params | BLEU | chrF | p vs first | sent/s | speed vs first |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        boot = r.get("bootstrap", {})
        ci = f" ± {boot['ci']:.2f}" if boot.get("ci") is not None else ""
        p = f"{boot['p_value']:.4f}" if boot.get("p_value") is not None else "-"
        precision = r.get("precision", "float32")
        name = (f"{r['model']} (CTranslate2 {precision})" if r.get("engine") == "ctranslate2"
                else r["model"] + (f" ({precision})" if precision != "float32" else ""))
        rows.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['bleu']:.2f}{ci} | {r['chrf']:.2f} | {p} | "
                    f"{r['sentences_per_s']:.1f} | {r['sentences_per_s'] / results[0]['sentences_per_s']:.2f}x |")
    first = results[0]
    rows.append(f"\n{first['n_sentences']} {first['split']} sentences, beam {first['beam']}, "
                f"{torch.get_num_threads()} threads (CTranslate2: {ct2_threads()[0]} translator threads); "
                f"BLEU {first['signature']}")
    return "\n".join(rows)


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "test", beam: int = 5,
             extra_refs: Sequence[str | Path] = (), batch_size: int = 32, out: str | Path | None = None,
             limit: int | None = None, force: bool = False, dtype: str = "float32") -> dict:
    """Translate a prepared split (or its first ``limit`` sentences) with the model in model_dir (a
    Hugging Face model with its weights in ``dtype``, or a CTranslate2 export), score it, write the
    hypotheses (to ``out``, default MODEL_DIR/SPLIT.hyp.TGT; checked before decoding).

    A model that records other languages than the data's is refused unless ``force``."""
    from combinekd.engines import load_translator

    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no split `{split}` (it has {', '.join(meta['splits'])})")
    sources, reference = split_text(data_dir, split)
    refs = [reference]
    for path in extra_refs:
        lines = read_lines(path)
        if len(lines) != len(sources):
            raise UserError(f"{path} has {len(lines)} lines but the {split} split has {len(sources)}")
        refs.append(lines)
    sources, refs = sources[:limit], [r[:limit] for r in refs]
    out_path = hypotheses_path(model_dir, split, meta, out)
    check_before_decoding(model_dir, data_dir, meta, out_path, force)
    engine = load_translator(model_dir, dtype)  # a Hugging Face model dir or a CTranslate2 export
    if cut := engine.too_long(sources):
        warn(f"{len(cut)} of the {len(sources)} {split} sentences are longer than the {engine.max_positions} "
             f"tokens {model_dir} reads: their ends are not translated")
    start = time.perf_counter()
    hyps = engine.translate(sources, beam=beam, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - start
    with atomic_file(out_path) as staged:
        staged.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result = {**corpus_scores(hyps, refs), "n_sentences": len(sources), "n_refs": len(refs),
              "params": engine.params, "engine": engine.engine, "precision": engine.precision, "beam": beam,
              "split": split, "hypotheses": str(out_path), "decode_seconds": round(seconds, 2),
              "sentences_per_s": round(len(sources) / seconds, 2)}
    if len(refs) == 1:  # the card's scores are single-reference, like its dev BLEU
        try:
            record_evaluation(model_dir, result, data_dir)
        except OSError as exc:
            warn(f"the scores were not added to {model_dir}'s model card: {exc.strerror or exc}")
    return result
