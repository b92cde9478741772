"""Which settings wrote a cache directory: the writer's settings record, the refusal naming what differs
(old -> new), and clearing a directory's cache files for an overwrite (DESIGN §2).

A writer's settings are its `d_model`, `layer`, `dtype` and metadata (models, data, shard size, ...),
less the keys that may change on a resume (the code version). Their fingerprint goes into every shard
sidecar; the record ``shards/settings.json`` holds the settings themselves, created once (atomically,
so of two slices starting at once one record wins and the other is checked against it). A writer
whose settings differ from the record's, the manifest's or any sidecar's is refused unless it
overwrites: a re-run never silently replaces another run's cache, and a same-settings re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from crossdiff_core.cache.format import (
    MANIFEST,
    REQUIRED_KEYS,
    SHARDS_DIR,
    TOKENS,
    contained_file,
    json_bytes,
    open_regular,
)
from crossdiff_core.errors import CacheError
from crossdiff_core.fileio import fsync_file, tmp_name

__all__ = ["RECORD", "check_settings", "claim_settings", "clear_cache_files", "fingerprint", "writer_settings"]

RECORD = f"{SHARDS_DIR}/settings.json"
_SHARD_FILES = ("shard-*.safetensors", "shard-*.json", "shard-*.tokens.parquet", ".shard-*.tmp-*", ".settings.json.tmp-*")


def writer_settings(d_model: int, layer: int, dtype: str, metadata: dict, resume_ignores: tuple[str, ...]) -> dict:
    """What a writer's shards depend on (JSON values): `metadata` less the keys in `resume_ignores`."""
    kept = {k: v for k, v in json.loads(json.dumps(metadata, allow_nan=False)).items() if k not in resume_ignores}
    return {"d_model": int(d_model), "layer": int(layer), "dtype": dtype, "metadata": kept}


def fingerprint(settings: dict) -> str:
    """sha256 of the settings' canonical JSON (what every shard sidecar records)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is absent, not a regular file, or not JSON (never blocks)."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError, CacheError):
        return None


def _from_manifest(m: Any, resume_ignores: tuple[str, ...]) -> dict | None:
    if not isinstance(m, dict) or not all(k in m for k in ("d_model", "layer", "dtype")):
        return None
    meta = {k: v for k, v in m.items() if k not in REQUIRED_KEYS and k != "format_version" and k not in resume_ignores}
    return {"d_model": m["d_model"], "layer": m["layer"], "dtype": m["dtype"], "metadata": meta}


def _evidence(path: Path, resume_ignores: tuple[str, ...]) -> list[tuple[str, dict | None, str]]:
    """(fingerprint, settings or None, file) for each file in `path` that says which settings wrote it."""
    out = []
    rec = _read_json(path / RECORD)
    if isinstance(rec, dict) and isinstance(rec.get("settings"), dict):
        out.append((fingerprint(rec["settings"]), rec["settings"], RECORD))
    m = _from_manifest(_read_json(path / MANIFEST), resume_ignores)
    if m is not None:
        out.append((fingerprint(m), m, MANIFEST))
    for f in sorted((path / SHARDS_DIR).glob("shard-*.json")):
        side = _read_json(f)
        if isinstance(side, dict) and isinstance(side.get("fingerprint"), str):
            out.append((side["fingerprint"], None, f"{SHARDS_DIR}/{f.name}"))
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) > 40:
        return json.dumps(v[:16] + "...")
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 48 else s[:45] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting that differs (metadata keys without their `metadata.` prefix)."""
    a, b = _flat(old), _flat(new)
    missing = object()
    out = []
    for k in sorted(a.keys() | b.keys(), key=lambda k: (k.startswith("metadata."), k)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            show = lambda v: "(none)" if v is missing else _short(v)  # noqa: E731
            out.append(f"{k.removeprefix('metadata.')}: {show(va)} -> {show(vb)}")
    return out


def check_settings(path: Path, settings: dict, resume_ignores: tuple[str, ...]) -> None:
    """Refuse (CacheError saying what differs, old -> new) if `path` holds cache files written with other settings."""
    fp = fingerprint(settings)
    other = [e for e in _evidence(path, resume_ignores) if e[0] != fp]
    if not other:
        return
    diff = next((differences(s, settings) for _, s, _ in other if s is not None), [])
    if diff:
        what = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
    else:
        what = f"{other[0][2]} was written under settings {other[0][0][:12]}..., this run's are {fp[:12]}..."
    raise CacheError(f"{path} holds an activation cache written with other settings ({what}): pass --overwrite "
                     "(overwrite=True) to replace it (its cache files are deleted first), delete the directory, or "
                     "write to another --out")


def claim_settings(path: Path, settings: dict, resume_ignores: tuple[str, ...], *, replace: bool = False) -> None:
    """Check `path`'s cache files against `settings`, then record them (once; `replace`: rewrite the record)."""
    check_settings(path, settings, resume_ignores)
    final = path / RECORD
    rec = _read_json(final)
    if not replace and isinstance(rec, dict) and rec.get("settings") == settings:
        return
    tmp = tmp_name(final)
    try:
        tmp.write_bytes(json_bytes({"fingerprint": fingerprint(settings), "settings": settings}))
        fsync_file(tmp)
        if replace or (final.exists() and rec is None):  # an unreadable record says nothing: replace it
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)  # create-if-absent, atomically: of two writers starting at once, one wins
            except FileExistsError:
                pass
    finally:
        tmp.unlink(missing_ok=True)
    check_settings(path, settings, resume_ignores)  # the loser of that race is checked against the winner


def clear_cache_files(path: Path) -> list[str]:
    """Delete `path`'s cache files (manifest first, the settings record last); return what was deleted.

    Only what a cache consists of: manifest.json, tokens.parquet, the shard files the manifest lists (if
    they are inside `path`) and the writer's files in shards/. Nothing outside `path` is touched, and a
    symlink is removed, never its target.
    """
    removed = []

    def rm(f: Path) -> None:
        if f.is_symlink() or (f.exists() and not f.is_dir()):
            f.unlink()
            removed.append(str(f.relative_to(path)))

    listed = _read_json(path / MANIFEST)
    rm(path / MANIFEST)
    rm(path / TOKENS)
    for s in listed.get("shards", []) if isinstance(listed, dict) and isinstance(listed.get("shards"), list) else []:
        try:
            rm(contained_file(path, s.get("file") if isinstance(s, dict) else None, "manifest shard"))
        except CacheError:
            pass  # not inside the cache (or not a file name): never ours to delete
    for pattern in _SHARD_FILES:
        for f in sorted((path / SHARDS_DIR).glob(pattern)):
            rm(f)
    rm(path / RECORD)
    return removed
