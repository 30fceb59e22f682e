"""Model cards: a ``README.md`` in the Hugging Face model-card format for every model dir that
``train`` or ``export`` writes (YAML header, then what the model is, how it was made, its scores)."""

from __future__ import annotations

import json
from pathlib import Path

from combinekd.files import atomic_file

AVERAGE_INFO = "averaged.json"  # what `combinekd average` averaged (average.py)
TAGS = ("translation", "combinekd", "knowledge-distillation")
METRICS = ("bleu", "chrf")


def _stop_reason(summary: dict) -> str:
    """How a finished run ended, for its card."""
    if summary.get("stopped_early"):
        return ", stopped early"
    if summary.get("stopped_by") == "max_hours":
        return ", stopped when its time budget (train.max_hours) was spent"
    return ""


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _header(languages: list[str]) -> str:
    lines = ["---", "language:"] + [f"- {lang}" for lang in languages if lang]
    if not any(languages):
        lines[-1] = "language: []"
    lines += ["license:  # fill in: the license of your training data and teacher allows", "tags:"]
    lines += [f"- {tag}" for tag in TAGS] + ["metrics:"] + [f"- {m}" for m in METRICS] + ["---", ""]
    return "\n".join(lines)


def _shape(config: dict) -> str:
    arch = {"pegasus": "pre-LN Transformer (transformers' Pegasus classes)",
            "marian": "post-LN Transformer (transformers' Marian classes)"}.get(config.get("model_type"),
                                                                            str(config.get("model_type")))
    return (f"{arch}: {config.get('encoder_layers')} encoder + {config.get('decoder_layers')} decoder layers, "
            f"d_model {config.get('d_model')}, feed-forward {config.get('encoder_ffn_dim')}, "
            f"{config.get('encoder_attention_heads')} heads, vocabulary {config.get('vocab_size')}, "
            f"at most {config.get('max_position_embeddings')} tokens")


def _params(model_dir: Path) -> int | None:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        return None
    from combinekd.export import _count_parameters

    return _count_parameters(weights)


def log_entries(model_dir: Path) -> list[dict]:
    """The entries of a run's train_log.jsonl (unreadable lines skipped; none without the file)."""
    try:
        text = (model_dir / "train_log.jsonl").read_text(encoding="utf-8")
    except OSError:
        return []
    entries = []
    for row in text.splitlines():
        try:
            entry = json.loads(row)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _objective(model_dir: Path) -> list[str]:
    """The objective's describe() lines as the (last) run recorded them in train_log.jsonl."""
    lines: list[str] = []
    for entry in log_entries(model_dir):
        if isinstance(entry.get("objective"), list):
            lines = [str(x) for x in entry["objective"]]
    return lines


def averaged_weights(steps: list[int], dev: dict[str, float | None] | None = None) -> str:
    """How an average's weights are named: "the model of update S" or "the mean of the models of updates
    S1, S2, ...", each with its dev BLEU in brackets when ``dev`` (by update, as text) is given."""
    which = ", ".join(f"{step:,} ({dev.get(str(step))})" if dev is not None else str(step) for step in steps)
    return f"the model of update {which}" if len(steps) == 1 else f"the mean of the models of updates {which}"


def training_section(model_dir: Path, evaluations: list[dict] | None = None) -> tuple[list[str], list[str]]:
    """``(markdown lines, languages)`` about how the model in ``model_dir`` was trained, and its scores:
    the best dev BLEU of training and the ``evaluations`` that ``combinekd evaluate`` recorded."""
    import yaml

    try:
        cfg = yaml.safe_load((model_dir / "train_config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    summary = _read_json(model_dir / "train_summary.json")
    data = cfg.get("data_dir") or summary.get("data")
    meta = _read_json(Path(data) / "meta.json") if data else {}
    languages = [meta.get("src_lang"), meta.get("tgt_lang")]
    if not cfg and not summary:
        return _scores_section(None, cfg, evaluations), languages
    lines = ["## Training", ""]
    distill = cfg.get("distill")
    if distill:
        weights = ", ".join(f"{k} {distill.get(k)}" for k in ("w_hard", "w_soft", "w_layer", "w_attn")
                            if distill.get(k) is not None)
        lines += [f"- Method: knowledge distillation (combinekd) from the teacher `{distill.get('teacher')}`"
                  f" (weights preset `{distill.get('weights')}`: {weights}; temperature {distill.get('temperature')})"]
        if distill.get("init_from_teacher"):
            lines += [f"- Initialised from the teacher: `{json.dumps(distill['init_from_teacher'])}`"]
    else:
        lines += ["- Method: trained from scratch with label-smoothed cross-entropy (no teacher)"]
    objective = _objective(model_dir)
    if objective:
        lines += ["- Objective and layer mapping:", ""] + [f"      {line}" for line in objective] + [""]
    lines += [f"- Data: `{data}` ({meta.get('src_lang')}->{meta.get('tgt_lang')}, "
              f"{summary.get('pairs', '?')} training pairs)"]
    if summary:
        lines += [f"- Updates: {summary.get('steps')} (best dev BLEU at update {summary.get('best_step')}"
                  f"{_stop_reason(summary)}); "
                  f"{summary.get('train_seconds')} s of training"]
    averaged = _read_json(model_dir / AVERAGE_INFO)  # written by `combinekd average`
    if averaged:
        which = averaged_weights(averaged.get("steps", []), averaged.get("dev_bleu_during_training", {}))
        lines += [f"- Weights: {which} (dev BLEU during training), made by `combinekd average` from "
                  f"`{averaged.get('source_run')}`"]
    lines += ["- Full configuration: `train_config.yaml`; training log: `train_log.jsonl`", ""]
    # the run's best dev BLEU is that of its best single model, not of an average
    lines += _scores_section(None if averaged else summary.get("best_dev_bleu"), cfg, evaluations)
    return lines, languages


def _scores_section(best_dev: float | None, cfg: dict, evaluations: list[dict] | None) -> list[str]:
    """The scores table: the best dev BLEU of training (beam ``train.eval_beam``) and one row per
    recorded evaluation (split, data, sentences, beam, precision), with the sacreBLEU signatures."""
    from combinekd.evaluate import corpus_scores

    evaluations = evaluations or []
    if best_dev is None and not evaluations:
        return []
    rows = ["## Scores", "", "| split | BLEU | chrF |", "|---|---:|---:|"]
    if best_dev is not None:
        rows.append(f"| dev (best, during training) | {best_dev:.2f} | - |")
    for e in evaluations:
        rows.append(f"| {e['split']} (`{e['data']}`, {e['n_sentences']:,} sentences, beam {e['beam']}, "
                    f"{e['precision']}) | {e['bleu']:.2f} | {e['chrf']:.2f} |")
    # without evaluations: the signature validation's BLEU has
    bleu = evaluations[-1]["signature"] if evaluations else corpus_scores(["x"], [["x"]])["signature"]
    rows += ["", f"BLEU signature: `{bleu}`"]
    if evaluations:
        rows.append(f"chrF signature: `{evaluations[-1]['chrf_signature']}`")
    rows.append("")
    if best_dev is not None:
        train = cfg.get("train") or {}
        beam, cap = train.get("eval_beam"), train.get("eval_max_sentences")
        rows.append(f"Dev BLEU: validation during training (beam {beam}{f', first {cap} sentences' if cap else ''}).")
    rows += ["The other rows are recorded by `combinekd evaluate MODEL_DIR --data DATADIR` (run it for test scores).",
             ""]
    return rows


SCORES_FILE = "scores.json"


def record_evaluation(model_dir: str | Path, result: dict, data_dir: str | Path) -> bool:
    """Add an evaluation's scores to the model card of a dir that combinekd wrote (a ``train`` output or
    an ``export``), replacing an earlier evaluation of the same split, data, length, beam and precision;
    kept in ``MODEL_DIR/scores.json``. Any other model dir (e.g. a downloaded teacher) is left as it is:
    returns False."""
    model_dir = Path(model_dir)
    export_info = _read_json(model_dir / "combinekd_export.json")
    if not export_info and not (model_dir / "train_summary.json").is_file():
        return False
    keys = ("split", "n_sentences", "beam", "precision")
    entry = {"data": str(data_dir), **{k: result[k] for k in keys},
             **{k: result[k] for k in ("bleu", "chrf", "signature", "chrf_signature")}}
    scores = _read_json(model_dir / SCORES_FILE).get("evaluations", [])
    scores = [e for e in scores if any(e.get(k) != entry[k] for k in ("data", *keys))] + [entry]
    with atomic_file(model_dir / SCORES_FILE) as staged:
        staged.write_text(json.dumps({"evaluations": scores}, indent=1) + "\n", encoding="utf-8")
    if export_info:
        write_export_card(model_dir, export_info["source_model"], export_info, name=model_dir.name)
    else:
        write_train_card(model_dir)
    return True


def write_train_card(model_dir: str | Path, name: str | None = None) -> Path:
    """Write ``model_dir/README.md`` for the best model a ``train`` run saved there (or the average that
    ``combinekd average`` made of its models), titled ``name`` (default: the dir's name)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    training, languages = training_section(model_dir, _read_json(model_dir / SCORES_FILE).get("evaluations"))
    params = _params(model_dir)
    lines = [_header(languages), f"# {name or model_dir.name}", "",
             f"A {languages[0]}->{languages[1]} translation model trained with combinekd.", "",
             "## Model", "", f"- {_shape(config)}",
             f"- Parameters: {params:,}" if params else "- Parameters: unknown",
             f"- Size on disk: {(model_dir / 'model.safetensors').stat().st_size / 1e6:.1f} MB (safetensors)"
             if (model_dir / "model.safetensors").is_file() else "", "",
             "Use: `combinekd translate MODEL_DIR < input.txt`, or transformers' `AutoTokenizer` and "
             "`AutoModelForSeq2SeqLM` with `generate()` (or, on transformers 4.x, "
             "`pipeline(\"translation\", model=MODEL_DIR)`); `combinekd export` makes a CTranslate2 copy.", ""]
    return _write(model_dir, lines + training)


def write_export_card(out: str | Path, source: str | Path, info: dict, name: str | None = None) -> Path:
    """Write ``out/README.md`` for a CTranslate2 export of ``source`` (titled ``name``, default out's name;
    ``out`` may be a staging dir)."""
    out, source = Path(out), Path(source)
    config = _read_json(source / "config.json")
    training, languages = training_section(source, _read_json(out / SCORES_FILE).get("evaluations"))
    languages = [info.get("source_lang") or languages[0], info.get("target_lang") or languages[1]]
    size = (out / "model.bin").stat().st_size if (out / "model.bin").is_file() else 0
    lines = [_header(languages), f"# {name or out.name}", "",
             f"A CTranslate2 export ({info['quantization']}) of the {languages[0]}->{languages[1]} model "
             f"`{info['source_model']}`, made by `combinekd export` with ctranslate2's TransformersConverter.", "",
             "## Model", "", f"- {_shape(config)}", f"- Parameters: {info.get('params', 0):,}",
             f"- Quantization: {info['quantization']}", f"- Size on disk: {size / 1e6:.1f} MB (model.bin)", "",
             "Use: `combinekd translate DIR < input.txt` or `combinekd evaluate DIR --data DATADIR` "
             "(the SentencePiece tokenizer files are in this dir).", ""]
    return _write(out, lines + training)


def _write(directory: Path, lines: list[str]) -> Path:
    target = directory / "README.md"
    with atomic_file(target) as staged:
        staged.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return target
