"""Files that are never seen half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder, are flushed to disk, and replace
    the target with one rename; the folder is synced so the rename survives a crash. Any
    error (a full disk included) leaves the previous file untouched and is raised.
    """
    atomic_write_parts(path, [data])


def atomic_write_parts(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """``atomic_write_bytes`` for a file written piece by piece (a large model: its tensors
    go to disk as they are, never first joined into one buffer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
