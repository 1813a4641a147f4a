"""Atomic file writes: the one implementation of "write to a temporary sibling, flush, fsync, rename into place".

A reader sees the old file or the new one, never half of one; a crash leaves at worst a hidden temporary
(`.<name>.tmp-<pid>-<random>`) beside the target. `replace=False` refuses to overwrite an existing file (the
rename is then a hard link, which fails atomically when the target exists), for artifacts that must never be
silently replaced.

Directories (`replace_directory`, `recover_directory`): a directory that must change as a whole (a checkpoint
tag rewritten by `nulls-unlearn purge`) is staged complete under a temporary sibling, marked ready by a rename,
and swapped in by two renames; `recover_directory` finishes a swap a crash interrupted. The old bytes are
removed only once the new directory is in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Iterator


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name in `path`'s directory (same file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def temp_glob(pattern: str = "*") -> str:
    """A glob matching the temporaries `temp_sibling` makes for names matching `pattern` (stale ones are what a
    killed writer leaves)."""
    return f".{pattern}.tmp-*"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True) -> Path:
    """Move a finished temporary onto `path`. `replace=False`: FileExistsError if `path` exists."""
    tmp, path = Path(tmp), Path(path)
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # fails if `path` exists, atomically
        finally:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write (by any library); on success it is fsynced and renamed onto `path`, on
    error it is removed and `path` is untouched."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise FileExistsError(f"{path} already exists (refusing to overwrite it)")
    tmp = temp_sibling(path)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        commit(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", replace: bool = True) -> Iterator[IO]:
    """`open()` for writing through a temporary sibling (text modes use UTF-8)."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes files; mode {mode!r} does not")
    with atomic_path(path, replace) as tmp:
        kwargs = {} if "b" in mode else {"encoding": "utf-8"}
        with open(tmp, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes, replace: bool = True) -> Path:
    with atomic_open(path, "wb", replace) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, replace: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), replace)


def write_json(path: str | os.PathLike, payload: Any, replace: bool = True, indent: int | None = 2) -> Path:
    """JSON with sorted keys and a trailing newline."""
    return write_text(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n", replace)


# ------------------------------------------------------------------------------------------------ directories
_READY = "ready"
_REPLACED = "replaced"
_REMOVED = "removed"


def _marked(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}.{mark}-{os.getpid()}-{secrets.token_hex(4)}")


def _siblings(path: Path, mark: str) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.{mark}-*"))


def replace_directory(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished directory `staged` (a `temp_sibling` of `target`) in place of `target`.

    Steps, each a rename: staged -> `.<name>.ready-*` (it is complete), target -> `.<name>.replaced-*`, ready ->
    target; then the replaced directory is deleted. A crash before the second rename leaves `target` as it was;
    after it, `target` is missing and `recover_directory(target)` moves the ready directory in. Readers that
    look for `target` meanwhile find it missing (checkpoint readers then fall back to another tag)."""
    staged, target = Path(staged), Path(target)
    ready = _marked(target, _READY)
    os.rename(staged, ready)
    _fsync_dir(target.parent)
    old = _marked(target, _REPLACED)
    if target.exists():
        os.rename(target, old)
    os.rename(ready, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def remove_path(path: str | os.PathLike) -> Path:
    """Delete a file or directory tree the user asked to remove: first renamed to a hidden `.<name>.removed-*`
    sibling (one atomic step: readers see it or do not), then deleted; `recover_directory` finishes a deletion a
    crash interrupted."""
    path = Path(path)
    doomed = _marked(path, _REMOVED)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    if doomed.is_dir():
        shutil.rmtree(doomed)
    else:
        doomed.unlink()
    return path


def recover_directory(target: str | os.PathLike) -> list[str]:
    """Finish or undo what an interrupted `replace_directory` or staging left beside `target`; returns what it
    did, one line each. A ready directory replaces a missing target; a replaced directory is deleted once the
    target exists (the swap completed); unfinished staging temporaries are deleted, and so are removals a crash
    interrupted."""
    target = Path(target)
    done = []
    for doomed in _siblings(target, _REMOVED):
        shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
        done.append(f"{target}: finished an interrupted removal ({doomed.name})")
    ready = _siblings(target, _READY)
    if ready and not target.exists():
        os.rename(ready[-1], target)
        _fsync_dir(target.parent)
        done.append(f"{target}: finished an interrupted replacement ({ready[-1].name})")
        ready = ready[:-1]
    if target.exists():
        for stale in ready + _siblings(target, _REPLACED) + sorted(target.parent.glob(temp_glob(target.name))):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
            done.append(f"{target}: removed the leftover {stale.name}")
    return done
