"""Atomic folder writes: a crash or an interrupt never leaves a half-written artifact that a
later run would read as complete, and a write never replaces a folder that is not an earlier
artifact of the same kind (a mistyped ``--out`` must not delete someone's files)."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_replaceable(folder: str | Path, marker: str, what: str) -> Path:
    """Where ``what`` (e.g. "a compressed model") may be written: ``folder`` resolved, when it
    does not exist, is empty, or holds ``marker`` (an earlier artifact of that kind, which the
    write replaces). Otherwise ``FileExistsError`` saying what to do; call it before long work."""
    folder = Path(folder).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        raise FileExistsError(f"{folder} is or contains the current directory; writing {what} there would "
                              "replace it: give a new folder for --out")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; {what} is written as a folder: give a new folder for --out")
    if folder.is_dir() and not (folder / marker).exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists, is not empty and does not hold {what} (no {marker}); RankLab only "
                              "replaces its own folders: give a new or empty folder for --out, or delete this one")
    return folder


@contextmanager
def atomic_folder(folder: str | Path, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``. When the block ends normally it replaces
    ``folder`` in one rename; when it raises (or is interrupted) it is deleted. ``folder`` must
    pass ``check_replaceable(folder, marker, what)``, before and after the block; the block
    must write ``marker``."""
    folder = check_replaceable(folder, marker, what)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield tmp
        if not (tmp / marker).exists():
            raise RuntimeError(f"writing {what}: {marker} was not written")
        check_replaceable(folder, marker, what)  # nothing else appeared there meanwhile
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
