"""The one writer of files: every file a command writes goes through ``atomic_write``.

A temp file in the destination's folder is written, flushed and fsynced, renamed over the destination,
and the folder is fsynced; on any failure (a full disk, a kill signal turned into an exception) the temp
file is removed and the previous file, if any, is untouched. A process killed outright leaves at most a
hidden ``.NAME.XXXX.tmp`` next to the destination, which ``remove_stale_temp_files`` clears."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(
    path: Path | str, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO]:
    """``with atomic_write(path) as handle: ...``: ``path`` holds either its old content or all of the new.

    ``mode`` is "w" (text, ``encoding``/``newline`` as for ``open``) or "wb"."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not the temp file that could not be made
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    with atomic_write(path, "w", encoding=encoding, newline="") as handle:
        handle.write(text)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def fsync_folder(folder: Path | str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path | str, pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temp files that killed writers left in ``folder``; returns them. Call it only while
    no other process writes the folder (a run folder: with its lock held)."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
