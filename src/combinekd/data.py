"""Parallel corpora: reading and validating Moses-style files, SentencePiece, token-count batching.

A prepared DATADIR (written by :func:`prepare`) holds::

    meta.json                     languages, sizes, filter counts, tokenizer origin
    tokenizer/                    a Hugging Face tokenizer (shared SentencePiece vocabulary)
    {train,dev,test}.{src,tgt}    the cleaned text (train after filtering)
    {train,dev,test}.ids.safetensors   token ids: src, src_offsets, tgt, tgt_offsets
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import os
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

from combinekd.errors import UserError
from combinekd.files import atomic_dir

SPLITS = ("train", "dev", "test")
LARGE_CORPUS = 100_000  # pairs; prepare shows its progress from this size on


# ----------------------------------------------------------------------------- reading text
def read_lines(path: str | Path) -> list[str]:
    """Read a UTF-8 text file (gzipped if its name ends in ``.gz``), one segment per line.

    Line ends may be LF, CRLF or CR alone (old Mac files); a CR alone inside a file with LF line
    ends is refused, as other tools would split the line there. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{path}: not a valid gzip file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8") from None
    if "\r" in text and "\n" not in text:
        text = text.replace("\r", "\n")  # CR-only line ends
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    for number, line in enumerate(lines, 1):
        if "\r" in line:
            raise UserError(f"{path}:{number}: a carriage return (CR) inside the line: mixed line ends? "
                            "Convert the file to LF line ends (e.g. with dos2unix)")
    return lines


def corpus_file(prefix: str | Path, lang: str) -> Path:
    """``PREFIX.LANG``, or ``PREFIX.LANG.gz`` when only that exists."""
    path = Path(f"{prefix}.{lang}")
    gzipped = path.with_name(path.name + ".gz")
    if not path.is_file() and gzipped.is_file():
        return gzipped
    if not path.is_file():
        raise UserError(f"file not found: {path} (nor {gzipped.name})")
    return path


def read_parallel(prefix: str | Path, src_lang: str, tgt_lang: str, drop_empty: bool = False
                  ) -> tuple[list[str], list[str], int]:
    """Read PREFIX.src_lang / PREFIX.tgt_lang (or their ``.gz``): line-aligned, stripped segments.

    A pair with an empty side is an error naming its file and line, or, with ``drop_empty``
    (training data), left out; returns ``(src, tgt, number of pairs left out)``."""
    src_path, tgt_path = corpus_file(prefix, src_lang), corpus_file(prefix, tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    if not src:
        raise UserError(f"{src_path} is empty")
    if not drop_empty:
        for path, lines in ((src_path, src), (tgt_path, tgt)):
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    raise UserError(f"{path}:{number}: empty segment")
    pairs = [(s.strip(), t.strip()) for s, t in zip(src, tgt)]
    kept = [(s, t) for s, t in pairs if s and t]
    if not kept:
        raise UserError(f"{src_path}, {tgt_path}: every pair has an empty side")
    return [s for s, _ in kept], [t for _, t in kept], len(pairs) - len(kept)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: Path, src_lang: str, tgt_lang: str,
                    model_type: str = "unigram"):
    """Train one shared SentencePiece model and wrap it as a ``MarianTokenizer`` saved in out_dir.

    Ids follow OPUS-MT / CTranslate2 conventions: ``</s>`` = 0, ``<unk>`` = 1, ``<pad>`` = last."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
            eos_id=0, unk_id=1, bos_id=-1, pad_id=-1, num_threads=2, minloglevel=2,
            input_sentence_size=2_000_000, shuffle_input_sentence=True)
    except RuntimeError as exc:
        raise UserError(f"SentencePiece training failed: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("source.spm", "target.spm"):
        (out_dir / name).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = MarianTokenizer(source_spm=str(out_dir / "source.spm"), target_spm=str(out_dir / "target.spm"),
                                vocab=str(out_dir / "vocab.json"), source_lang=src_lang, target_lang=tgt_lang)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "source.spm", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json")


def hub_hint(path: str | Path) -> str:
    """A hint to append to "not found" when a missing local path looks like a Hugging Face Hub id."""
    text = str(path)
    if Path(path).exists() or not _HUB_ID.fullmatch(text):
        return ""
    local = f"models/{text.split('/')[1]}"
    return (f"; `{text}` looks like a Hugging Face Hub id, and combinekd reads local dirs only: "
            f"download it first (`hf download {text} --local-dir {local}`) and pass {local}")


def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer from a model dir or a DATADIR."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}{hub_hint(path)}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer (no tokenizer_config.json, tokenizer.json or SentencePiece "
                        "model): copy the tokenizer files that came with the model into it")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must agree between teacher, student and data: vocabulary and special ids."""
    return {"vocab_size": len(tokenizer), "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id, "sample": tokenizer("combinekd tokenizer check 123")["input_ids"]}


def encode(tokenizer, src: Sequence[str], tgt: Sequence[str], batch: int = 2000, desc: str | None = None
           ) -> tuple[list, list]:
    """Token ids (with end-of-sentence) for both sides; a progress bar named ``desc`` on large inputs."""
    from tqdm import tqdm

    src_ids, tgt_ids = [], []
    for start in tqdm(range(0, len(src), batch), desc=desc, unit="batch", leave=False,
                      disable=desc is None or len(src) < LARGE_CORPUS):
        out = tokenizer(list(src[start:start + batch]), text_target=list(tgt[start:start + batch]))
        src_ids.extend(out["input_ids"])
        tgt_ids.extend(out["labels"])
    return src_ids, tgt_ids


# ----------------------------------------------------------------------------- prepared data
@dataclass
class Split:
    """Token ids of one split, with the text they came from."""

    src: list[list[int]]
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


def _flatten(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    return flat, offsets


def save_split(path: Path, split: Split) -> None:
    src, src_off = _flatten(split.src)
    tgt, tgt_off = _flatten(split.tgt)
    save_file({"src": src, "src_offsets": src_off, "tgt": tgt, "tgt_offsets": tgt_off}, str(path))


def load_split(data_dir: str | Path, name: str, max_length: int | None = None) -> Split:
    """Load token ids of a split; sequences longer than max_length are truncated (keeping </s>)."""
    path = Path(data_dir) / f"{name}.ids.safetensors"
    if not path.is_file():
        raise UserError(f"{path} not found: is {data_dir} a directory made by `combinekd prepare`?")
    t = load_file(str(path))

    def unflatten(flat: torch.Tensor, off: torch.Tensor) -> list[list[int]]:
        values, bounds = flat.tolist(), off.tolist()
        seqs = [values[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        if max_length:
            seqs = [s if len(s) <= max_length else s[:max_length - 1] + s[-1:] for s in seqs]
        return seqs

    return Split(unflatten(t["src"], t["src_offsets"]), unflatten(t["tgt"], t["tgt_offsets"]))


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data dir (no meta.json); run `combinekd prepare`")
    return json.loads(path.read_text(encoding="utf-8"))


def split_text(data_dir: str | Path, name: str) -> tuple[list[str], list[str]]:
    """The source and reference text of a prepared split."""
    return read_lines(Path(data_dir) / f"{name}.src"), read_lines(Path(data_dir) / f"{name}.tgt")


def filter_pairs(src_ids: list, tgt_ids: list, max_len: int, max_ratio: float) -> list[int]:
    """Indices of training pairs no longer than max_len tokens whose length ratio is <= max_ratio."""
    keep = []
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        long, short = max(len(s), len(t)), min(len(s), len(t))
        if long <= max_len and long <= max_ratio * short:
            keep.append(i)
    return keep


def prepare(src_lang: str, tgt_lang: str, prefixes: dict[str, str], out: str | Path, *, vocab_size: int = 8000,
            tokenizer_from: str | Path | None = None, max_len: int = 200, max_ratio: float = 3.0,
            spm_type: str = "unigram", overwrite: bool = False) -> dict:
    """Validate the corpus, train (or reuse) the tokenizer, filter training pairs, write DATADIR.

    Training pairs with an empty side are left out and counted (``empty``); in dev and test they
    are errors. An existing DATADIR at ``out`` is replaced only with ``overwrite``."""
    if not max_ratio >= 1:
        raise UserError(f"max_ratio must be a number >= 1 (a length ratio), got {max_ratio}")
    check_data_out(out, overwrite)
    corpora = {name: read_parallel(prefix, src_lang, tgt_lang, drop_empty=name == "train")
               for name, prefix in prefixes.items()}
    with data_dir_writer(out, overwrite) as tmp:
        if tokenizer_from is not None:
            tokenizer = load_tokenizer(tokenizer_from)
            tokenizer.save_pretrained(tmp / "tokenizer")
        else:
            train_src, train_tgt, _ = corpora["train"]
            if len(train_src) >= LARGE_CORPUS:
                print(f"training SentencePiece on {len(train_src):,} pairs", file=sys.stderr)
            tokenizer = train_tokenizer(train_src + train_tgt, vocab_size, tmp / "tokenizer", src_lang, tgt_lang,
                                        spm_type)
        meta = {"src_lang": src_lang, "tgt_lang": tgt_lang, "vocab_size": len(tokenizer),
                "tokenizer_from": str(tokenizer_from) if tokenizer_from else None, "splits": {}}
        for name, (src, tgt, empty) in corpora.items():
            src_ids, tgt_ids = encode(tokenizer, src, tgt, desc=f"encode {name}")
            keep = filter_pairs(src_ids, tgt_ids, max_len, max_ratio) if name == "train" else range(len(src))
            keep = list(keep)
            if not keep:
                raise UserError(f"{prefixes[name]}: no pair survives the length filter (max_len={max_len})")
            save_split(tmp / f"{name}.ids.safetensors", Split([src_ids[i] for i in keep], [tgt_ids[i] for i in keep]))
            (tmp / f"{name}.src").write_text("".join(src[i] + "\n" for i in keep), encoding="utf-8")
            (tmp / f"{name}.tgt").write_text("".join(tgt[i] + "\n" for i in keep), encoding="utf-8")
            meta["splits"][name] = {"pairs": len(keep), "filtered": len(src) - len(keep), "empty": empty,
                                    "src_tokens": sum(len(src_ids[i]) for i in keep),
                                    "tgt_tokens": sum(len(tgt_ids[i]) for i in keep)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def check_writable(path: str | Path) -> None:
    """Refuse early an output path whose nearest existing parent is not a directory we may write to."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: permission denied in {parent}")


def check_data_out(target: str | Path, overwrite: bool = False) -> None:
    """Refuse an output DATADIR before any work: a file, a foreign non-empty directory, an existing
    DATADIR (unless ``overwrite``) or a place we cannot write."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a directory: choose another --out")
    if target.is_dir() and any(target.iterdir()):
        if not (target / "meta.json").is_file():
            raise UserError(f"{target} exists and is not a data dir made by combinekd: choose another --out")
        if not overwrite:
            raise UserError(f"{target} already holds a data dir: add --overwrite to replace it, "
                            "or choose another --out")
    check_writable(target)


@contextmanager
def data_dir_writer(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`files.atomic_dir` for a DATADIR: refuses a foreign directory, and an existing DATADIR
    unless ``overwrite`` (see :func:`check_data_out`)."""
    check_data_out(target, overwrite)
    with atomic_dir(Path(target).resolve()) as tmp:
        yield tmp


# ----------------------------------------------------------------------------- batching
def token_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int, *, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Group example indices into batches of at most max_tokens padded tokens per side.

    Examples are sorted by length (random tie-breaks) so each batch holds similar lengths
    (bucketing); the batch order is shuffled. Deterministic for a given (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(src_lens)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: max(src_lens[i], tgt_lens[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(src_lens[i], tgt_lens[i])
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(split: Split, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch: ``input_ids``/``attention_mask`` for the source, ``labels`` (-100 = padding)."""
    src = [split.src[i] for i in indices]
    tgt = [split.tgt[i] for i in indices]
    input_ids = torch.full((len(src), max(map(len, src))), pad_id, dtype=torch.long)
    labels = torch.full((len(tgt), max(map(len, tgt))), -100, dtype=torch.long)
    for row, (s, t) in enumerate(zip(src, tgt)):
        input_ids[row, :len(s)] = torch.tensor(s)
        labels[row, :len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}
