"""Dev BLEU against training time for several runs: a PNG and a Markdown/JSON table.

    python experiments/curves.py RUN_DIR|CURVES.json [...] --png docs/x.png --md results/x.md [--title T] [--minutes M]

Reads each run's train_log.jsonl (validation entries carry ``train_seconds``, the training time so
far, validation excluded) and train_config.yaml. The table gives per run: architecture, shape, lr,
warm-up, batch tokens, updates, best dev BLEU (and when), training minutes, and dev BLEU per
CPU-hour at the best point (minutes x threads). The JSON also holds each run's evaluations (update, dev
BLEU, dev loss, training seconds), so that a curve outlives the run that made it: given in place of a run
dir, such a JSON adds its runs again (a run whose dir is gone, beside new ones). ``--minutes`` cuts every
run at one budget of training minutes, so that short candidate runs and a long run compare like for like.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

# the schedule of runs (and of curve JSONs) from before `train.schedule` existed: there was no other then
OLD_SCHEDULE = "inverse-sqrt"


def read_run(run: Path) -> dict:
    cfg = yaml.safe_load((run / "train_config.yaml").read_text(encoding="utf-8"))
    evals = [e for e in map(json.loads, (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines())
             if "dev_bleu" in e and "train_seconds" in e]
    evals = list({e["step"]: e for e in evals}.values())  # a resumed run may repeat a step
    return {"name": run.name, "cfg": cfg, "evals": evals}


def summary(run: dict) -> dict:
    m, t = run["cfg"]["model"], run["cfg"]["train"]
    threads = t.get("threads") or 2
    return {"run": run["name"], "arch": m.get("arch", "post-ln"),
            "shape": f"{m['encoder_layers']}+{m['decoder_layers']} d{m['d_model']} ffn{m['ffn_dim']}",
            "schedule": t.get("schedule", OLD_SCHEDULE), "lr": t["lr"], "warmup": t["warmup_steps"],
            "max_tokens": t["max_tokens"], "dropout": m["dropout"], "threads": threads,
            **progress(run["evals"], threads)}


def progress(evals: list[dict], threads: int) -> dict:
    """The row's figures that depend on the evaluations: the last update, the best dev BLEU, when, and per CPU-hour."""
    best = max(evals, key=lambda e: e["dev_bleu"]) if evals else None
    minutes = best["train_seconds"] / 60 if best else 0.0
    return {"updates": evals[-1]["step"] if evals else 0,
            "best_dev_bleu": best["dev_bleu"] if best else None, "best_step": best["step"] if best else None,
            "best_minutes": round(minutes, 1), "last_dev_loss": evals[-1]["dev_loss"] if evals else None,
            "bleu_per_cpu_hour": round(best["dev_bleu"] / (minutes * threads / 60), 2) if best and minutes else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--md", type=Path, required=True)
    parser.add_argument("--title", default="dev BLEU against CPU time")
    parser.add_argument("--updates-only", action="store_true",
                        help="plot against updates only (runs on another machine, e.g. a GPU: CPU time means nothing)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="keep each run's evaluations within this many minutes of training (one time budget for all)")
    args = parser.parse_args()
    def within(evals: list[dict]) -> list[dict]:
        return [e for e in evals if args.minutes is None or e["train_seconds"] <= args.minutes * 60]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, rows = [], []
    for path in args.runs:
        if path.suffix == ".json":  # curves written by this script: their rows and evaluations as they were
            for c in json.loads(path.read_text(encoding="utf-8")):
                runs.append({"name": c["run"], "evals": within(c["evals"])})
                rows.append({"schedule": OLD_SCHEDULE, **{k: v for k, v in c.items() if k != "evals"},
                             **progress(runs[-1]["evals"], c["threads"])})
        else:
            runs.append(read_run(path))
            runs[-1]["evals"] = within(runs[-1]["evals"])
            rows.append(summary(runs[-1]))
    if args.updates_only:
        fig, by_step = plt.subplots(1, 1, figsize=(6.5, 4.5))
        axes = [by_step]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        by_step = axes[1]
    for run, row in zip(runs, rows):
        bleu = [e["dev_bleu"] for e in run["evals"]]
        if not args.updates_only:
            axes[0].plot([e["train_seconds"] / 60 * row["threads"] for e in run["evals"]], bleu, marker="o",
                         label=row["run"])
        by_step.plot([e["step"] for e in run["evals"]], bleu, marker="o", label=row["run"])
    if not args.updates_only:
        axes[0].set_xlabel("CPU-minutes of training (wall minutes x threads, validation excluded)")
    axes[0].set_ylabel("dev BLEU (greedy)")
    by_step.set_xlabel("updates (immune to other load on the machine)")
    fig.suptitle(args.title)
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)

    cols = ["run", "arch", "shape", "schedule", "lr", "warmup", "max_tokens", "dropout", "threads", "updates",
            "best_dev_bleu", "best_step", "best_minutes", "bleu_per_cpu_hour", "last_dev_loss"]
    lines = [f"# {args.title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    curves = [{**row, "evals": [{k: e.get(k) for k in ("step", "dev_bleu", "dev_loss", "train_seconds")}
                                for e in run["evals"]]} for run, row in zip(runs, rows)]
    args.md.with_suffix(".json").write_text(json.dumps(curves, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
