"""A new user's first hour (issue 8): output paths checked before expensive work, no silently wrong
output, one line instead of a traceback, CLI conventions, set-up and a README that runs as written."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from combinekd.cli import build_parser, main
from combinekd.config import load_config
from combinekd.data import load_tokenizer, read_lines, read_meta
from combinekd.errors import UserError
from combinekd.models import load_model_dir

from conftest import has_translation_pipeline, save_random_model, tiny_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny random xx->yy model (64 positions) saved by combinekd, with its tokenizer."""
    return save_random_model(data_dir, tmp_path_factory.mktemp("usability") / "model", seed=0, encoder_layers=1,
                             decoder_layers=1, d_model=32, ffn_dim=64, heads=2)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if anything is translated."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoded before checking the output path")

    monkeypatch.setattr("combinekd.evaluate.translate", refuse)
    for engine in ("HFTranslator", "CT2Translator"):
        monkeypatch.setattr(f"combinekd.engines.{engine}.translate", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def stdin_bytes(monkeypatch, data: bytes, errors: str = "strict", tty: bool = False) -> None:
    class Stdin(io.TextIOWrapper):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setattr(sys, "stdin", Stdin(io.BytesIO(data), encoding="utf-8", errors=errors))


def run_prepare(corpus: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--src-lang", "xx", "--tgt-lang", "yy", "--train", str(corpus / "train"),
                 "--dev", str(corpus / "dev"), "--vocab-size", "48", "--out", str(out), *extra])


# ----------------------------------------------------------------------------- 1. output paths first
def test_distill_data_checks_out_before_translating(model_dir, data_dir, tmp_path, capsys, no_decoding):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["distill-data", str(model_dir), "--data", str(data_dir), "--out", str(foreign)]) == 2
    assert "not a data dir made by combinekd" in one_line_error(capsys)
    assert main(["distill-data", str(model_dir), "--data", str(data_dir), "--out", str(data_dir)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_evaluate_checks_out_before_decoding_and_names_it(model_dir, data_dir, tmp_path, capsys, no_decoding):
    out = tmp_path / "missing" / "test.hyp"
    assert main(["evaluate", str(model_dir), "--data", str(data_dir), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert str(out.parent) in err and ".tmp" not in err
    assert main(["evaluate", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys)


def test_compare_checks_every_model_before_decoding(model_dir, data_dir, tmp_path, capsys, no_decoding):
    assert main(["compare", str(model_dir), str(tmp_path / "missing"), "--data", str(data_dir)]) == 2
    assert "no model found" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 2. no lost work
def test_train_refuses_a_folder_that_is_not_a_combinekd_run(data_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {data_dir}\noutput_dir: {mine}\ntrain: {{max_steps: 1}}\n")
    assert main(["train", str(config)]) == 2
    assert "not a combinekd run" in one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_prepare_refuses_to_replace_a_data_dir_without_overwrite(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"train": 100, "dev": 5, "test": 5})
    out = tmp_path / "data"
    assert run_prepare(corpus, out, "--test", str(corpus / "test")) == 0
    assert run_prepare(corpus, out) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert "test" in read_meta(out)["splits"], "the refused run left the data dir as it was"
    assert run_prepare(corpus, out, "--overwrite") == 0
    assert "test" not in read_meta(out)["splits"]


# ----------------------------------------------------------------------------- 3. wrong output without a word
def test_saved_tokenizer_limit_is_the_models(model_dir):
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    model_config = json.loads((model_dir / "config.json").read_text())
    assert tokenizer_config["model_max_length"] == model_config["max_position_embeddings"] == 64
    assert load_model_dir(model_dir)[1].model_max_length == 64
    from transformers import AutoTokenizer

    long = " ".join(["w1"] * 100)
    assert len(AutoTokenizer.from_pretrained(str(model_dir))(long, truncation=True).input_ids) == 64
    if has_translation_pipeline():
        from transformers import pipeline

        translator = pipeline("translation", model=str(model_dir))
        assert translator(long, truncation=True, max_new_tokens=3)  # no IndexError


def test_translate_warns_when_it_truncates(model_dir, monkeypatch, capsys):
    long = " ".join(f"w{i % 16}" for i in range(100))
    stdin_bytes(monkeypatch, f"w1 w2\n{long}\n".encode())
    assert main(["translate", str(model_dir), "--beam", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert re.search(r"warning: line 2 .*64", captured.err) and "line 1 " not in captured.err


def test_empty_input_line_gives_empty_output_line(model_dir, monkeypatch, capsys):
    from combinekd.evaluate import translate

    model, tokenizer = load_model_dir(model_dir)
    sizes = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: sizes.append(len(kw["input_ids"])) or generate(**kw))
    assert translate(model, tokenizer, ["w1 w2", "", "  "], beam=1)[1:] == ["", ""]
    assert sizes == [1], "empty lines are not decoded"
    stdin_bytes(monkeypatch, b"w1\n\nw2\n")
    assert main(["translate", str(model_dir), "--beam", "1"]) == 0
    assert capsys.readouterr().out.split("\n")[1] == ""


# ----------------------------------------------------------------------------- 4. languages
def test_evaluate_refuses_a_language_mismatch_unless_forced(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    swapped = tmp_path / "yy-xx"
    shutil.copytree(data_dir, swapped)
    meta = read_meta(swapped)
    meta.update(src_lang="yy", tgt_lang="xx")
    (swapped / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(swapped / "tokenizer")
    shutil.copytree(model_dir, swapped / "tokenizer")  # the data's own tokenizer records yy->xx too
    config = json.loads((swapped / "tokenizer" / "tokenizer_config.json").read_text())
    config.update(source_lang="yy", target_lang="xx")
    (swapped / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    args = ["evaluate", str(model_dir), "--data", str(swapped), "--beam", "1", "--limit", "2",
            "--out", str(tmp_path / "hyp")]
    with monkeypatch.context() as patch:
        patch.setattr("combinekd.evaluate.translate", lambda *a, **k: pytest.fail("decoded"))
        assert main(args) == 2
    err = one_line_error(capsys)
    assert "xx->yy" in err and "yy->xx" in err and "--force" in err
    assert main([*args, "--force"]) == 0
    assert main(["evaluate", str(model_dir), "--data", str(data_dir), "--beam", "1", "--limit", "2",
                 "--out", str(tmp_path / "hyp")]) == 0, "matching languages need no --force"


# ----------------------------------------------------------------------------- 5. line ends
def test_cr_only_line_ends_are_line_ends(tmp_path):
    path = tmp_path / "mac.xx"
    path.write_bytes(b"w1 w2\rw3\rw4\r")
    assert read_lines(path) == ["w1 w2", "w3", "w4"]
    path.write_bytes(b"w1 w2\r\nw3\r\n")
    assert read_lines(path) == ["w1 w2", "w3"]


def test_a_lone_cr_inside_a_line_is_refused(tmp_path):
    path = tmp_path / "mixed.xx"
    path.write_bytes(b"w1\nw2\rw3\nw4\n")
    with pytest.raises(UserError, match=r"mixed.xx:2: .*carriage return"):
        read_lines(path)


# ----------------------------------------------------------------------------- 6. one line, not a traceback
@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # surrogateescape: Python's C/POSIX locale
def test_latin1_on_translate_stdin_is_one_line(model_dir, monkeypatch, capsys, errors):
    stdin_bytes(monkeypatch, "w1 w2\nw3 \xe9t\xe9\n".encode("latin-1"), errors=errors)
    assert main(["translate", str(model_dir), "--beam", "1"]) == 2
    assert "line 2: not valid UTF-8" in one_line_error(capsys)


def test_model_dir_without_tokenizer_is_one_line(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    assert main(["translate", str(bare)]) == 2
    assert "no tokenizer" in one_line_error(capsys)


def test_hub_id_gets_a_download_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"Hub id.*download"):
        load_model_dir("Helsinki-NLP/opus-mt-de-en")
    with pytest.raises(UserError, match=r"Hub id.*download"):
        load_tokenizer("Helsinki-NLP/opus-mt-de-en")


# ----------------------------------------------------------------------------- 7. CLI conventions
def test_version(capsys):
    from combinekd import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"combinekd {__version__}"


def _subparsers(parser):
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                yield name, child
                yield from _subparsers(child)


def test_every_help_shows_the_defaults():
    for name, sub in _subparsers(build_parser()):
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    prepare = dict(_subparsers(build_parser()))["prepare"]
    assert "(default: 8000)" in prepare.format_help() and "(default: None)" not in prepare.format_help()
    for flag in ("--train", "--dev", "--test"):
        help_text = next(a.help for a in prepare._actions if flag in a.option_strings)
        assert "prefix" in help_text.lower(), flag


def test_a_mistyped_config_key_gets_a_suggestion(tmp_path):
    base = {"data_dir": "d", "output_dir": "o"}
    with pytest.raises(UserError, match="model.encoder_layer: unknown key; did you mean `encoder_layers`"):
        load_config(None, ["model.encoder_layer=3"], base=base)
    with pytest.raises(UserError, match="did you mean `strategy`"):
        load_config(None, ["distill.teacher=t", "distill.encoder.stratgy=skip"], base=base)


def test_whole_floats_are_accepted_for_whole_numbers():
    base = {"data_dir": "d", "output_dir": "o"}
    cfg = load_config(None, ["train.max_steps=1e3", "train.warmup_steps=4000.0", "train.max_tokens=2.5e3"], base=base)
    assert (cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.max_tokens) == (1000, 4000, 2500)
    assert isinstance(cfg.train.max_steps, int)
    with pytest.raises(UserError, match="train.max_steps"):
        load_config(None, ["train.max_steps=2.5"], base=base)
    assert load_config(None, ["train.lr=1e-3"], base=base).train.lr == 0.001


def test_config_show_lists_every_key_with_default_and_description(capsys):
    from combinekd.config import config_keys

    assert main(["config", "--show"]) == 0
    out = capsys.readouterr().out
    keys = list(config_keys())
    assert len(keys) > 40
    for key, default, description in keys:
        assert description, f"{key} has no description"
        line = next(line for line in out.splitlines() if line.split()[0] == key)
        assert default in line and description.split()[0] in line
    assert re.search(r"^model\.encoder_layers +6 ", out, re.M)
    assert re.search(r"^distill\.encoder\.strategy +overlap .*skip", out, re.M)


def test_config_prints_a_resolved_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data_dir: d\noutput_dir: o\n")
    assert main(["config", str(config), "--set", "train.max_steps=1e3"]) == 0
    assert "max_steps: 1000" in capsys.readouterr().out


def test_translate_answers_each_line_on_a_terminal(model_dir, monkeypatch, capsys):
    from combinekd import evaluate

    sizes = []
    real = evaluate.translate
    monkeypatch.setattr(evaluate, "translate", lambda model, tok, lines, **kw: sizes.append(len(lines))
                        or real(model, tok, lines, **kw))
    stdin_bytes(monkeypatch, b"w1\nw2\nw3\n", tty=True)
    assert main(["translate", str(model_dir), "--beam", "1"]) == 0
    assert sizes == [1, 1, 1] and len(capsys.readouterr().out.splitlines()) == 3


def test_prepare_drops_and_counts_empty_training_segments(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"train": 100, "dev": 5})
    lines = (corpus / "train.yy").read_text().splitlines()
    lines[3] = lines[7] = "  "
    (corpus / "train.yy").write_text("\n".join(lines) + "\n")
    assert run_prepare(corpus, tmp_path / "data") == 0
    assert "2 empty" in capsys.readouterr().out
    meta = read_meta(tmp_path / "data")
    assert meta["splits"]["train"]["empty"] == 2
    assert meta["splits"]["train"]["pairs"] + meta["splits"]["train"]["filtered"] == 98
    (corpus / "dev.xx").write_text("w1\n\nw2\nw3\nw4\n")
    assert run_prepare(corpus, tmp_path / "data2") == 2
    assert "dev.xx:2: empty segment" in one_line_error(capsys)


def test_prepare_reads_gzip_files(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", {"train": 100, "dev": 5})
    for name in ("train.xx", "dev.yy"):
        (corpus / f"{name}.gz").write_bytes(gzip.compress((corpus / name).read_bytes()))
        (corpus / name).unlink()
    assert run_prepare(corpus, tmp_path / "data") == 0
    assert read_lines(tmp_path / "data" / "dev.tgt") == read_lines(corpus / "dev.yy.gz")
    (corpus / "train.xx.gz").write_bytes(b"not gzip")
    assert run_prepare(corpus, tmp_path / "data2") == 2
    assert "train.xx.gz" in one_line_error(capsys)


@pytest.mark.parametrize("ratio", ["0.5", "nan", "-2", "x"])
def test_max_ratio_is_validated(tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as exit_info:
        run_prepare(tmp_path, tmp_path / "data", "--max-ratio", ratio)
    assert exit_info.value.code == 2 and "--max-ratio" in capsys.readouterr().err


def test_mapping_groups_needs_the_groups_strategy(capsys):
    code = main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "skip",
                 "--groups", "[[1],[2]]"])
    assert code == 2 and "--strategy groups" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 8. Makefile
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$LOG"
case "$*" in
  "-m venv "*) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo ok > "$3/bin/.has-pip" ;;
  "-m pip"*) test -f "$(dirname "$0")/.has-pip" || exit 1 ;;
esac
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_torch_index_and_a_half_made_venv(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(fake, tmp_path / ".venv" / "bin" / "python")  # a half-made venv: python but no pip
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log)}

    def make(*args):
        return subprocess.run(["make", "-s", "install", f"PYTHON={fake}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    result = make("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert "-m venv .venv" in calls, "the half-made venv is rebuilt"
    assert "-m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in calls
    log.unlink()
    (tmp_path / ".venv" / ".installed-stamp").unlink()
    assert make().returncode == 0
    calls = log.read_text().splitlines()
    assert "-m venv .venv" not in calls and "-m pip install --quiet torch==2.13.0" in calls
    assert "TORCH_INDEX" in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- 9. README
def readme_commands() -> list[list[str]]:
    """The shell commands of the README's ```sh blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_every_readme_command_runs_as_written(tmp_path):
    """Replay the README: every combinekd command parses, and every path it reads is in the repository
    or made by an earlier command (the expensive steps are simulated, not run)."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    made: set[str] = set()  # paths that earlier commands create
    parser = build_parser()
    languages = None

    def exists(path: str) -> bool:
        return (ROOT / path).exists() or any(path == m or path.startswith(m + "/") for m in made)

    ran = set()
    for words in readme_commands():
        if words[0] in ("bash", "python", ".venv/bin/python"):
            assert words[1] == "-c" or (ROOT / words[1]).is_file(), f"the README runs {words[1]}, not in the repository"
            continue
        if words[0] in ("make", "source", "hf", "cd", "git"):
            if words[:2] == ["hf", "download"]:
                made.add(words[words.index("--local-dir") + 1])
            if words[0] == "make" and "demo" in words:
                made.add("demo")
            continue
        if words[0] == "echo":
            words = words[words.index("|") + 1:] if "|" in words else []
            if not words:
                continue
        if words[0] in ("torchrun", "accelerate"):  # a launcher's options (parsed by it), then a combinekd command
            launcher = words[2:] if words[0] == "accelerate" else words[1:]
            assert words[0] == "torchrun" or words[1] == "launch", words
            parsed = (launch_command_parser() if words[0] == "accelerate" else get_args_parser()).parse_args(launcher)
            assert parsed.module and parsed.training_script == "combinekd", words
            words = ["combinekd", *parsed.training_script_args]
        assert words[0] in ("combinekd", ".venv/bin/combinekd"), f"unknown command in the README: {words}"
        if words[1:] in (["--version"], ["--help"]):
            continue
        args = parser.parse_args(words[1:])
        ran.add(args.command)
        if args.command == "data":
            made.add(args.out)
            languages = ("es", "en")
        elif args.command == "prepare":
            prefixes = [args.train, args.dev] + ([args.test] if args.test else [])
            for prefix in prefixes:
                assert exists(prefix.rsplit("/", 1)[0]), f"prepare reads {prefix}.*, which nothing makes"
            if languages:
                assert (args.src_lang, args.tgt_lang) == languages, "prepare's languages are the corpus'"
            if args.tokenizer_from:
                assert exists(args.tokenizer_from), args.tokenizer_from
            made.add(args.out)
        elif args.command == "train":
            assert (ROOT / args.config).is_file(), args.config
            cfg = load_config(ROOT / args.config, args.set or [])
            assert exists(str(cfg.data_dir)), f"{args.config} reads {cfg.data_dir}, which nothing makes"
            if cfg.distill:
                assert exists(str(cfg.distill.teacher)), cfg.distill.teacher
            made.add(str(cfg.output_dir))
        elif args.command == "export":
            assert exists(args.model_dir), f"export reads {args.model_dir}, which nothing makes"
            made.add(args.out)
        elif args.command in ("evaluate", "compare", "translate", "distill-data", "benchmark"):
            for model in getattr(args, "model_dirs", None) or [getattr(args, "model_dir", None)
                                                                or args.teacher_dir]:
                assert exists(model), f"{args.command} reads {model}, which nothing makes"
            if getattr(args, "data", None):
                assert exists(args.data), args.data
            if args.command == "distill-data":
                made.add(args.out)
    assert {"data", "prepare", "train", "evaluate", "compare", "translate"} <= ran


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every config in configs/ loads with the schema of this version (no stale or misspelt key), and so
    does every `--set KEY=VALUE` its comments offer (each of the values in `KEY=a|b|c`)."""
    load_config(path)
    offered = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            for key, values in re.findall(r"--set ([\w.]+)=([^\s`)]+)", line):
                for value in values.split("|"):
                    load_config(path, [f"{key}={value}"])
                    offered += 1
    assert path.name != "student-cpu.yaml" or offered >= 8  # its comments list the methods, one line each
