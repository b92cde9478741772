"""Writing files so that a reader never sees half of one: write to a temporary name beside the target,
then rename it (``os.replace`` is atomic on one file system). JSON is written with non-finite numbers as
``null``, so every file stays valid JSON for DVC, MLflow and browsers. :func:`file_sha256` is the
digest records of written files hold (a crosscoder's weights, a checkpoint)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def tmp_name(final: str | os.PathLike) -> Path:
    """A temporary name beside ``final``, unique per writer (concurrent writers never share one)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, fsync: bool = False) -> Path:
    """``write(tmp)`` to a temporary name in ``path``'s directory, then rename it to ``path``.

    ``fsync``: flush the file to disk before the rename (for data a crash must not lose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf as None, numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(obj: Any, path: str | os.PathLike, *, indent: int = 2) -> Path:
    """``obj`` as JSON (see :func:`json_safe`), atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=str) + "\n"
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_jsonl(rows: list[Any], path: str | os.PathLike) -> Path:
    """One JSON object per line, atomically."""
    text = "".join(json.dumps(json_safe(r), allow_nan=False, default=str) + "\n" for r in rows)
    return atomic_write(path, lambda p: Path(p).write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()
