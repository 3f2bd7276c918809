"""File helpers every package uses: atomic writes, inter-process locks, cache reads that
survive a corrupt file."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")
# what a truncated, overwritten or foreign .npz raises when read
CORRUPT_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) between processes;
    the kernel releases it if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def current_umask() -> int:
    """The process's file-creation mask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and an atomic rename (a kill leaves
    the old file or the new one, never a partial one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # as open() would: readable by colleagues
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CACHE_KEY = "cache_key"  # the array of every cache file that holds the key it was written under


def write_cache(path: str | Path, **arrays) -> None:
    """Write ``arrays`` as the .npz cache file ``path`` (atomically), with the key it is
    written under: its name without the extension, which the caller derives from the key."""
    path = Path(path)
    buffer = io.BytesIO()
    keyed: dict[str, Any] = {CACHE_KEY: np.array(path.stem), **arrays}
    np.savez(buffer, **keyed)
    atomic_write_bytes(path, buffer.getvalue())


def read_cache(path: str | Path, read: Callable[[np.lib.npyio.NpzFile], T], what: str) -> T | None:
    """``read(np.load(path))``; None when there is no such file. A cache file that cannot be
    read (truncated, overwritten, from another version) or that holds another key's entry (a
    file copied or renamed into place: ``write_cache`` stores the key) is named on stderr,
    deleted and reported as absent, so the caller recomputes it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            problem = foreign_entry(saved, path.stem)
            if problem is None:
                return read(saved)
    except CORRUPT_NPZ as err:
        problem = f"{type(err).__name__}: {err}"
    print(f"[l2d-bench] corrupt {what} cache file {path} ({problem}); deleted, recomputing it.",
          file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return None


def foreign_entry(saved: np.lib.npyio.NpzFile, key: str) -> str | None:
    """Why the cache file ``saved`` is not the entry of ``key`` (None when it is)."""
    if CACHE_KEY not in saved.files:
        return "it carries no cache key: written by an older version or another program"
    found = str(saved[CACHE_KEY])
    if found != key:
        return f"it holds the entry of key {found!r}, not {key!r}: a file copied or renamed into place"
    return None
