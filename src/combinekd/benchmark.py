"""``combinekd benchmark``: decoding speed, latency, memory, size and BLEU of HF and CTranslate2 models
on one prepared split, every engine with the same thread count. Each model is measured in its own
process, so its peak resident memory is its own. On a machine whose speed drifts (a shared or
thermally limited one: 10-15% within minutes on the 2-core machines this was developed on), ``rounds``
measures every model several times in alternation and reports each figure's median."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Sequence

from combinekd.errors import UserError

SETTINGS = ((5, 32), (5, 1), (1, 32), (1, 1))  # (beam, batch size)


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike getrusage's ru_maxrss, which a
    spawned child inherits from its parent). A CTranslate2 model's figure includes transformers (and the
    torch it imports) loaded for the tokenizer: a serving process using sentencepiece alone needs less."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _measure(model_dir: str, data_dir: str, split: str, threads: int, limit: int | None, dtype: str) -> dict:
    """One model, all settings (run in a child process); ``dtype``: a Hugging Face model's precision."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from sacrebleu.metrics import BLEU

    from combinekd.data import split_text
    from combinekd.engines import CT2Translator, HFTranslator, is_ct2_dir

    if is_ct2_dir(model_dir):  # without importing torch: its memory is not the CT2 model's
        engine = CT2Translator(model_dir, inter_threads=threads, intra_threads=1)
    else:
        import torch

        torch.set_num_threads(threads)
        engine = HFTranslator(model_dir, dtype)
    sources, refs = split_text(data_dir, split)
    sources, refs = sources[:limit], refs[:limit]
    engine.translate(sources[:8], beam=5, batch_size=8)  # warm-up
    rows, bleu = [], BLEU()  # the metric and signature evaluate uses
    for beam, batch in SETTINGS:
        latencies: list[float] = []
        start = time.perf_counter()
        if batch == 1:
            hyps = []
            for sentence in sources:
                begin = time.perf_counter()
                hyps += engine.translate([sentence], beam=beam, batch_size=1)
                latencies.append(time.perf_counter() - begin)
        else:
            hyps = engine.translate(sources, beam=beam, batch_size=batch)
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in engine.tokenizer(hyps)["input_ids"]) if hyps else 0
        row = {"beam": beam, "batch_size": batch, "seconds": round(seconds, 3),
               "sentences_per_s": round(len(sources) / seconds, 2), "target_tokens_per_s": round(tokens / seconds, 1),
               "bleu": round(bleu.corpus_score(hyps, [refs]).score, 2), "signature": str(bleu.get_signature())}
        if latencies:
            ordered = sorted(latencies)
            row["latency_mean_ms"] = round(1000 * sum(ordered) / len(ordered), 2)
            row["latency_p95_ms"] = round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2)
        rows.append(row)
    return {"model": model_dir, "engine": engine.engine, "params": engine.params, "size_bytes": engine.size,
            "precision": engine.precision,
            "peak_rss_mb": _peak_rss_mb(),
            "threads": threads, "n_sentences": len(sources), "split": split, "runs": rows}


def benchmark(model_dirs: Sequence[str | Path], data_dir: str | Path, split: str = "test", threads: int | None = None,
              limit: int | None = None, dtype: str = "float32", rounds: int = 1) -> list[dict]:
    """Measure every model (checked first, before any decoding); the Hugging Face ones with their weights
    in ``dtype`` (CTranslate2 models keep their export's precision); ``rounds`` times, the models in
    turn in each round (see :func:`combine_rounds`)."""
    from combinekd.data import read_meta
    from combinekd.engines import check_translator_dir, is_ct2_dir, warn_slow_dtype

    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"{data_dir} has no split `{split}` (it has {', '.join(meta['splits'])})")
    for model_dir in model_dirs:
        check_translator_dir(model_dir)
    if not all(is_ct2_dir(model_dir) for model_dir in model_dirs):
        warn_slow_dtype(dtype)  # once here, not in every measuring process
    threads = threads or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    measured: list[list[dict]] = [[] for _ in model_dirs]
    for _ in range(rounds):
        for i, model_dir in enumerate(model_dirs):
            with context.Pool(1) as pool:
                measured[i].append(pool.apply(_measure, (str(model_dir), str(data_dir), split, threads, limit, dtype)))
    return [combine_rounds(m) for m in measured]


def combine_rounds(measured: Sequence[dict]) -> dict:
    """One model's rounds as one result: per setting the median of each speed and latency figure (the
    sentences/s of every round kept in ``sentences_per_s_rounds``), the highest peak memory; the rest
    (BLEU included: the same hypotheses every round) from the first round."""
    if len(measured) == 1:
        return measured[0]
    result = {**measured[0], "rounds": len(measured), "peak_rss_mb": max(m["peak_rss_mb"] for m in measured)}
    result["runs"] = []
    for i, run in enumerate(measured[0]["runs"]):
        same = [m["runs"][i] for m in measured]
        medians = {key: round(statistics.median(r[key] for r in same), 2) for key in
                   ("seconds", "sentences_per_s", "target_tokens_per_s", "latency_mean_ms", "latency_p95_ms") if key in run}
        result["runs"].append({**run, **medians, "sentences_per_s_rounds": [r["sentences_per_s"] for r in same]})
    return result


def markdown(results: Sequence[dict]) -> str:
    """One row per model and setting; speed ratios against the first model at the same setting."""
    rows = ["| model | engine | params | size | peak RSS | beam | batch | sent/s | tok/s | vs first | "
            "latency mean / p95 (batch 1) | BLEU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = {(r["beam"], r["batch_size"]): r for r in results[0]["runs"]}
    for result in results:
        engine = f"{result['engine']} {result['precision']}"
        for run in result["runs"]:
            base = first[(run["beam"], run["batch_size"])]
            latency = (f"{run['latency_mean_ms']:.1f} / {run['latency_p95_ms']:.1f} ms"
                       if "latency_mean_ms" in run else "-")
            rows.append(f"| {result['model']} | {engine} | {result['params'] / 1e6:.1f}M | "
                        f"{result['size_bytes'] / 1e6:.1f} MB | {result['peak_rss_mb']:.0f} MB | {run['beam']} | "
                        f"{run['batch_size']} | {run['sentences_per_s']:.1f} | {run['target_tokens_per_s']:.0f} | "
                        f"{run['sentences_per_s'] / base['sentences_per_s']:.2f}x | {latency} | {run['bleu']:.2f} |")
    head = results[0]
    rounds = f"; speeds and latencies are medians of {head['rounds']} rounds" if head.get("rounds") else ""
    rows.append(f"\n{head['n_sentences']} {head['split']} sentences, {head['threads']} threads for every engine{rounds}; "
                f"BLEU {head['runs'][0]['signature']}")
    return "\n".join(rows)


def plot(results: Sequence[dict], path: str | Path) -> None:
    """BLEU against sentences/s at beam 5, batch 32 (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, result in enumerate(results):  # a legend, not labels at the points: close points' labels overlapped
        run = next(r for r in result["runs"] if (r["beam"], r["batch_size"]) == (5, 32))
        ax.scatter(run["sentences_per_s"], run["bleu"], marker="osD^vP*X"[i % 8], s=40,
                   label=f"{Path(result['model']).name} ({result['engine']} {result['precision']})")
    ax.legend(fontsize=8)
    ax.set_xscale("log")  # ticks at 1, 2, 5 x 10^k as plain numbers (the default's minor labels overlapped)
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("sentences/s (beam 5, batch 32; log scale)")
    ax.set_ylabel("BLEU")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def write_outputs(results: Sequence[dict], out: str | Path) -> list[Path]:
    """OUT.md, OUT.json and OUT.png, each written atomically."""
    from combinekd.files import atomic_file

    out = Path(out)
    paths = [out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".png")]
    with atomic_file(paths[0]) as staged:
        staged.write_text(markdown(results) + "\n", encoding="utf-8")
    with atomic_file(paths[1]) as staged:
        staged.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with atomic_file(paths[2]) as staged:
        plot(results, staged.with_suffix(".png"))
        staged.with_suffix(".png").replace(staged)
    return paths
