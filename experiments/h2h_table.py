"""Score hypothesis files already written by `combinekd evaluate` against a prepared split and test
them in pairs (sacreBLEU's paired bootstrap, 1,000 samples), without decoding again:

    python experiments/h2h_table.py --data DATADIR --out results/NAME \
        "no-KD=RUN/student-nokd/test.hyp.en" "teacher=RUN/teacher/test.hyp.en" "CKD=RUN/student-ckd/test.hyp.en" \
        [--versus teacher]

Every system is tested against the first; ``--versus LABEL`` adds a column of p-values against LABEL.
Writes NAME.md (a table) and NAME.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from combinekd.data import read_lines, split_text
from combinekd.evaluate import corpus_scores, paired_bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("systems", nargs="+", help="LABEL=HYPOTHESES_FILE, the baseline first")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--versus", action="append", default=[], help="also test every system against LABEL")
    parser.add_argument("--out", required=True, help="output prefix (.md and .json)")
    args = parser.parse_args()
    systems = dict(s.split("=", 1) for s in args.systems)
    refs = [split_text(args.data, args.split)[1]]
    hyps = {label: read_lines(path) for label, path in systems.items()}
    rows = {label: corpus_scores(h, refs) for label, h in hyps.items()}
    bases = [next(iter(hyps)), *args.versus]
    for base in bases:
        ordered = {base: hyps[base], **{k: v for k, v in hyps.items() if k != base}}
        for label, result in paired_bootstrap(ordered, refs).items():
            rows[label][f"p_vs_{base}"] = result["p_value"]
            rows[label].setdefault("ci95", result["ci"])  # from the bootstrap against the first
    lines = ["| model | test BLEU | 95% CI | chrF | " + " | ".join(f"p vs {b}" for b in bases) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(bases)]
    for label, r in rows.items():
        ps = " | ".join("-" if r.get(f"p_vs_{b}") is None else f"{r[f'p_vs_{b}']:.3f}" for b in bases)
        lines.append(f"| {label} | {r['bleu']:.2f} | {r['ci95']:.2f} | {r['chrf']:.2f} | {ps} |")
    first = next(iter(rows.values()))
    lines.append(f"\n{len(refs[0])} {args.split} sentences; BLEU {first['signature']}; paired bootstrap, 1,000 samples")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"systems": systems, "scores": rows}, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
