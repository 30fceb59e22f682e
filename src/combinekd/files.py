"""Files that are never seen half-written, that colleagues can read, and one writer per directory.

Everything combinekd writes (data, models, checkpoints, hypotheses) is staged in a temporary
sibling named ``.NAME.tmp-*`` and moved into place with ``os.replace`` once complete. Staged files
and directories get the permissions the user's umask asks for (``0o666 & ~umask`` for files,
``0o777 & ~umask`` for directories): ``tempfile`` and safetensors create them private (0o600).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from combinekd.errors import UserError


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the modes a plain ``open``/``mkdir`` would."""
    umask = current_umask()
    path.chmod(0o777 & ~umask if path.is_dir() else 0o666 & ~umask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def staged_pattern(name_pattern: str) -> str:
    """The glob of what :func:`atomic_file` stages for targets named by ``name_pattern`` (a killed writer's
    leftovers)."""
    return _staging_prefix(Path(name_pattern)) + "*"


def _old_prefix(target: Path) -> str:
    return f".{target.name}.old-"


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` to write; when the block succeeds it becomes ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=_staging_prefix(target), dir=target.parent)
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
        apply_umask(staged)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path, *, merge: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; when the block succeeds its content becomes ``target``.

    ``merge=False`` replaces ``target`` as a whole. ``merge=True`` replaces only the entries the block
    wrote and keeps the others (a model saved into a run's output dir next to its checkpoints); the
    staging dir is then made inside ``target``."""
    target = Path(target)
    if merge:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target if merge else target.parent))
    try:
        yield staged
        apply_umask(staged)
        if merge:
            for item in sorted(staged.iterdir()):
                _replace(item, target / item.name)
        else:
            _replace(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    """``os.replace``, also over a directory: the old one is renamed aside (``.NAME.old-*``), then deleted."""
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(source, target)
        return
    old = Path(tempfile.mkdtemp(prefix=_old_prefix(target), dir=target.parent))
    os.replace(target, old)  # onto the empty placeholder
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def recover(target: str | Path) -> None:
    """Undo what a killed writer of ``target`` left: put back the old ``target`` if the kill came
    between the two renames of :func:`atomic_dir`, and delete staged leftovers.

    Only safe while no one else writes ``target`` (hold :func:`exclusive_lock`)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(_old_prefix(target) + "*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for leftover in olds + list(target.parent.glob(_staging_prefix(target) + "*")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(directory: str | Path, what: str = "run") -> Iterator[None]:
    """Hold an OS lock on ``directory/.lock`` for the block; refuse (UserError) if another process holds it.

    ``fcntl.flock`` locks belong to the open file: the kernel drops them when the holder exits or
    is killed, so a crashed run never leaves the directory locked."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    with open(lock, "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory} is in use by another {what} (it holds {lock}): wait for it to end "
                            f"or choose another output_dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
