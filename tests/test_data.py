"""Corpus validation, SentencePiece round trip, token batching, prepare's output."""

from __future__ import annotations

import json

import pytest

from combinekd.cli import main
from combinekd.data import load_split, load_tokenizer, read_meta, token_batches

from conftest import write_corpus


def run_prepare(corpus, out, capsys, *extra) -> tuple[int, str]:
    code = main(["prepare", "--src-lang", "xx", "--tgt-lang", "yy", "--train", str(corpus / "train"),
                 "--dev", str(corpus / "dev"), "--test", str(corpus / "test"), "--vocab-size", "48",
                 "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.err + ("" if code else captured.out)


@pytest.fixture
def small_corpus(tmp_path):
    return write_corpus(tmp_path / "c", {"train": 200, "dev": 10, "test": 10})


@pytest.mark.parametrize("breakage, message", [
    (lambda c: (c / "train.yy").write_text("v1\n", encoding="utf-8"), "has 200 lines but"),
    (lambda c: (c / "dev.xx").write_bytes(b"w1 w2\n\xff\xfe broken\n" + b"w3\n" * 8), "dev.xx:2: not valid UTF-8"),
    (lambda c: (c / "dev.xx").write_text("w1\n \n" + "w2\n" * 8, encoding="utf-8"), "dev.xx:2: empty segment"),
    (lambda c: (c / "test.yy").unlink(), "file not found"),
])
def test_bad_corpus_is_one_line_and_exit_2(small_corpus, tmp_path, capsys, breakage, message):
    breakage(small_corpus)
    out = tmp_path / "data"
    code, err = run_prepare(small_corpus, out, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists(), "no half-written output"


def test_prepare_writes_tokenizer_and_splits(small_corpus, tmp_path, capsys):
    out = tmp_path / "data"
    code, _ = run_prepare(small_corpus, out, capsys)
    assert code == 0
    meta = read_meta(out)
    assert meta["splits"]["train"]["pairs"] + meta["splits"]["train"]["filtered"] == 200
    assert {p.name for p in (out / "tokenizer").iterdir()} >= {"source.spm", "vocab.json", "tokenizer_config.json"}
    split = load_split(out, "dev")
    assert len(split) == 10 and all(seq[-1] == load_tokenizer(out).eos_token_id for seq in split.tgt)


def test_length_filter_reports_dropped_pairs(small_corpus, tmp_path, capsys):
    lines = (small_corpus / "train.yy").read_text(encoding="utf-8").splitlines()
    lines[5] = " ".join(["v1"] * 60)  # ratio far above 3
    (small_corpus / "train.yy").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out = run_prepare(small_corpus, tmp_path / "data", capsys)
    assert code == 0 and "filtered out (length/ratio)" in out
    assert read_meta(tmp_path / "data")["splits"]["train"]["filtered"] >= 1


def test_sentencepiece_round_trip(data_dir):
    tokenizer = load_tokenizer(data_dir)
    text = "w3 w11 w0 w15"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_token_batches_respect_budget_and_cover_everything():
    lengths = [((i * 7919) % 50) + 1 for i in range(1000)]
    longer = [max(a, b) for a, b in zip(lengths, lengths[::-1])]
    batches = token_batches(lengths, lengths[::-1], max_tokens=256, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    for batch in batches:
        longest = max(longer[i] for i in batch)
        assert longest * len(batch) <= 256 or len(batch) == 1
    assert batches == token_batches(lengths, lengths[::-1], max_tokens=256, seed=1, epoch=0)
    assert batches != token_batches(lengths, lengths[::-1], max_tokens=256, seed=1, epoch=1)
    # bucketing: batches hold similar lengths
    spread = [max(longer[i] for i in b) - min(longer[i] for i in b) for b in batches]
    assert sum(spread) / len(spread) < 3


def test_meta_is_json(data_dir):
    assert json.loads((data_dir / "meta.json").read_text())["src_lang"] == "xx"


def test_byte_order_mark_is_not_part_of_the_first_segment(tmp_path):
    from combinekd.data import read_lines

    path = tmp_path / "bom.xx"
    path.write_bytes("\ufeffw1 w2\nw3\n".encode("utf-8"))
    assert read_lines(path) == ["w1 w2", "w3"]
