"""Atomic folder writes: a crash or an interrupt never leaves a half-written artifact that a
later run would read as complete, and a write never replaces a folder that is not an earlier
artifact of the same kind, nor one that files were added to since (a mistyped ``--out`` must
not delete someone's files). Artifacts
read back give the numbers that were written (``EXACT_FLOATS``)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import MappingProxyType


def _pandas_before(major: int, minor: int) -> bool:
    try:
        return tuple(int(p) for p in version("pandas").split(".")[:2]) < (major, minor)
    except (PackageNotFoundError, ValueError):
        return True


# ``pd.read_csv`` keyword arguments that read every float64 back bit for bit: pandas before 3.1
# parses with a faster routine that is off in the last bits (a cached sensitivity grid then
# differed from the grid that was measured); from 3.1 that is the default and the argument
# is deprecated.
EXACT_FLOATS: Mapping[str, str] = MappingProxyType(
    {"float_precision": "round_trip"} if _pandas_before(3, 1) else {})


def holds(folder: Path, markers: Sequence[str]) -> bool:
    """Whether ``folder`` holds every file of ``markers``; a ``.json`` marker must also be a
    JSON object with a ``format`` key (RankLab writes one into each of its artifacts)."""
    if isinstance(markers, str):
        raise TypeError("markers is a sequence of file names, e.g. ('meta.json',)")
    for name in markers:
        path = folder / name
        if not path.is_file():
            return False
        if name.endswith(".json"):
            try:
                if "format" not in json.loads(path.read_text()):
                    return False
            except (OSError, ValueError, TypeError):
                return False
    return True


MANIFEST = ".ranklab-files"  # the files an artifact's write put in its folder, one relative path a line


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


# what an OS error says when a place cannot be written (permissions, a read-only or full disk)
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # what file browsers leave: not a user's work


def foreign_files(folder: Path) -> list[str]:
    """Files in an artifact's ``folder`` that its write did not put there (a user's notes, a
    plan saved into it), by its ``MANIFEST``; none known for folders written before manifests."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return []
    added = _files(folder) - set(manifest.read_text().splitlines()) - {MANIFEST}
    return sorted(f for f in added if Path(f).name not in JUNK)


def check_replaceable(folder: str | Path, markers: Sequence[str], what: str, cache: bool = False) -> Path:
    """Where ``what`` (e.g. "a compressed model") may be written: ``folder`` resolved, when it
    does not exist, is empty, or ``holds`` the ``markers`` of that kind of artifact (an earlier
    one, which the write replaces, unless files were added to it since). The folder it is
    written beside (the nearest existing one on the way), and ``folder`` itself when it exists,
    must be writable. Otherwise ``FileExistsError`` or ``PermissionError`` saying what to do;
    call it before long work. ``cache``: a folder of RankLab's own cache (replaced whatever was
    added to it; the messages name ``RANKLAB_CACHE``)."""
    folder = Path(folder).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:
        raise FileExistsError(f"{folder} is or contains the current directory; writing {what} there would "
                              "replace it: give a new folder for --out")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; {what} is written as a folder: give a new folder for --out")
    if folder.is_dir() and any(folder.iterdir()) and not holds(folder, markers):
        raise FileExistsError(f"{folder} exists, is not empty and does not hold {what} (no {' + '.join(markers)}); "
                              "RankLab only replaces its own folders: give a new or empty folder for --out, or "
                              "delete this one")
    if not cache and folder.is_dir() and (extra := foreign_files(folder)):
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise FileExistsError(f"{folder} holds {what} written earlier and also files added since ({shown}); "
                              "replacing it would delete them: move them out, or give another folder for --out")
    near = next(p for p in folder.parents if p.exists())  # where the new folder is made, then renamed
    for place in (near, *([folder] if folder.is_dir() else [])):  # an earlier one is moved aside
        if not place.is_dir() or not _can_create_in(place):
            fix = "set RANKLAB_CACHE to a folder you can write" if cache else "give another --out"
            raise PermissionError(f"cannot write {what} to {folder}: {place} is not a folder you can write in; {fix}")
    return folder


def _can_create_in(place: Path) -> bool:
    """Whether a folder can be made in ``place``, by making one and removing it: permission bits
    do not tell (root passes ``os.access`` on /proc and /sys, where nothing can be created;
    read-only mounts, ACLs)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ranklab-probe-", dir=place))
    except OSError:
        return False
    return True


@contextmanager
def atomic_folder(folder: str | Path, markers: Sequence[str], what: str, cache: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``. When the block ends normally it replaces
    ``folder`` by renames: an earlier ``folder`` is first renamed aside, deleted only once the
    new one is in place (a crash in between leaves it beside, as ``.NAME.old-*``, never lost);
    when the block raises (or is interrupted) the temporary folder is deleted. ``folder`` must
    pass ``check_replaceable(folder, markers, what, cache)``, before and after the block; the
    block must write the ``markers``."""
    folder = check_replaceable(folder, markers, what, cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield tmp
        if not holds(tmp, markers):
            raise RuntimeError(f"writing {what}: {' + '.join(markers)} not all written")
        (tmp / MANIFEST).write_text("".join(f"{f}\n" for f in sorted(_files(tmp))))
        check_replaceable(folder, markers, what, cache)  # nothing else appeared there meanwhile
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            try:
                folder.rename(old / folder.name)
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)  # nothing was moved: only the empty holder goes
                raise
        try:
            tmp.rename(folder)
        except BaseException:
            if old is not None:
                try:
                    (old / folder.name).rename(folder)  # put the earlier one back
                except OSError:
                    pass  # something else took its place: the earlier one stays beside, as .NAME.old-*
                else:
                    shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to the file ``path`` through a temp file renamed into place: a crash or an
    interrupt leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CacheWarning(UserWarning):
    """A result could not be written to RankLab's cache (it is used, just not kept)."""


def save_to_cache(save: Callable[[], object], what: str, folder: Path) -> bool:
    """Run ``save`` (writing ``what`` into ``folder`` of the cache); a cache that cannot be
    written (read-only, full) is said in a ``CacheWarning`` and skipped: the result in hand
    is used, and computed again next time. Returns whether it was saved."""
    try:
        save()
        return True
    except OSError as e:
        if not (isinstance(e, PermissionError) or e.errno in UNWRITABLE_ERRNOS):
            raise  # not the cache's place being unwritable: a real failure
        warnings.warn(f"could not cache {what} in {folder} ({e.strerror or e}): it is used now and computed again "
                      "next time; set RANKLAB_CACHE to a folder you can write to keep it", CacheWarning, stacklevel=2)
        return False
