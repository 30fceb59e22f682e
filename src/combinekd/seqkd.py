"""Sequence-level KD (Kim & Rush, 2016): a copy of a prepared DATADIR whose training targets are
the teacher's beam translations. The teacher decodes as `translate` does (a Hugging Face model dir, on
the GPU when there is one, in ``dtype``; or a CTranslate2 export, several times faster on a CPU).
Resumable: translations are appended to a partial file in chunks and a rerun continues after the last
finished chunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from combinekd.data import (Split, check_data_out, data_dir_writer, encode, load_tokenizer, read_lines, read_meta,
                            save_split, split_text)
from combinekd.engines import load_translator
from combinekd.errors import UserError
from combinekd.models import check_same_vocabulary


def distill_data(teacher_dir: str | Path, data_dir: str | Path, out: str | Path, *, beam: int = 5,
                 batch_size: int = 64, chunk: int = 512, overwrite: bool = False, dtype: str = "float32") -> dict:
    """Write ``out``: ``data_dir`` with the training targets replaced by the teacher's translations.

    ``out`` is checked before any translation; an existing DATADIR there is replaced only with
    ``overwrite``."""
    data_dir, out = Path(data_dir), Path(out)
    meta = read_meta(data_dir)
    check_data_out(out, overwrite)
    teacher = load_translator(teacher_dir, dtype)
    tokenizer = teacher.tokenizer
    check_same_vocabulary(tokenizer, load_tokenizer(data_dir), f"the teacher {teacher_dir}", f"the data in {data_dir}")
    sources, _ = split_text(data_dir, "train")
    partial = out.with_name(f".{out.name}.partial.tgt")
    job = out.with_name(f".{out.name}.partial.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    train_src = data_dir / "train.src"
    settings = {"teacher": str(Path(teacher_dir).resolve()), "data": str(data_dir.resolve()), "beam": beam,
                "precision": teacher.precision, "train_bytes": train_src.stat().st_size if train_src.is_file() else None}
    if not job.is_file() or json.loads(job.read_text(encoding="utf-8")) != settings:
        partial.unlink(missing_ok=True)  # a different job: start over
        job.write_text(json.dumps(settings), encoding="utf-8")
    if partial.is_file():  # drop a line cut short by an interruption
        text = partial.read_bytes()
        partial.write_bytes(text[:text.rfind(b"\n") + 1])
    done = read_lines(partial) if partial.is_file() else []
    if len(done) > len(sources):
        raise UserError(f"{partial} has more lines than {data_dir}/train.src: delete it and rerun")
    with partial.open("a", encoding="utf-8") as sink, \
            tqdm(total=len(sources), initial=len(done), desc="teacher translations", unit="sent") as bar:
        for start in range(len(done), len(sources), chunk):
            hyps = teacher.translate(sources[start:start + chunk], beam=beam, batch_size=batch_size)
            sink.write("".join(h.replace("\n", " ") + "\n" for h in hyps))
            sink.flush()
            bar.update(len(hyps))
    targets = read_lines(partial)
    if len(targets) != len(sources):
        raise UserError(f"{partial}: {len(targets)} translations for {len(sources)} sources; delete it and rerun")
    keep = [i for i, t in enumerate(targets) if t.strip()]
    src_ids, tgt_ids = encode(tokenizer, [sources[i] for i in keep], [targets[i] for i in keep])
    with data_dir_writer(out, overwrite) as tmp:
        for item in data_dir.iterdir():
            if not item.name.startswith("train."):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / "train.src").write_text("".join(sources[i] + "\n" for i in keep), encoding="utf-8")
        (tmp / "train.tgt").write_text("".join(targets[i] + "\n" for i in keep), encoding="utf-8")
        save_split(tmp / "train.ids.safetensors", Split(src_ids, tgt_ids))
        meta["splits"]["train"].update(pairs=len(keep), empty_teacher_outputs=len(targets) - len(keep),
                                       tgt_tokens=sum(map(len, tgt_ids)))
        meta["seqkd"] = {"teacher": str(teacher_dir), "engine": teacher.engine, "precision": teacher.precision,
                         "beam": beam, "from": str(data_dir)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    partial.unlink()
    job.unlink()
    return meta["splits"]["train"]
