"""File chores shared by the tasks: keyed output directories (resume only what the same settings
wrote) and atomic writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crossdiff_core.fileio import atomic_write, write_json, write_jsonl  # noqa: F401  (the tasks' writers)

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
