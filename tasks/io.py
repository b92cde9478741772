"""File chores shared by the tasks: keyed output directories (resume only what the same settings
wrote) and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEY_FILE = ".crossdiff-key"


def prepare_out(out: str | os.PathLike, key: str) -> bool:
    """Make ``out`` ready for a run whose settings and inputs digest to ``key``.

    DVC keeps these outputs across runs (``persist: true``) so that an interrupted stage resumes from
    its shards or checkpoint; but what other settings wrote must not be resumed, so a directory
    written under another key is emptied first. Returns True when earlier work is kept."""
    out = Path(out)
    kf = out / KEY_FILE
    if out.exists() and not (kf.is_file() and kf.read_text().strip() == key):
        shutil.rmtree(out)
    kept = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not kept:
        atomic_write(kf, lambda p: Path(p).write_text(key + "\n"))
    return kept


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp)`` to a temporary name in ``path``'s directory, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_jsonl(rows: list[Any], path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
