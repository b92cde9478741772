"""The activation cache's writer (DESIGN §2): shards written one by one, resumable, then one manifest.

Every file it writes follows `crossdiff_core.cache.format`; `finalize` rebuilds tokens.parquet and
manifest.json from the shard sidecars alone, so a resumed run gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from crossdiff_core.cache.format import (
    DTYPES,
    FORMAT_VERSION,
    INPUT_COLUMNS,
    MANIFEST,
    MODELS,
    REQUIRED_KEYS,
    SHARDS_DIR,
    SOURCES,
    TOKEN_SCHEMA,
    TOKENS,
    json_bytes,
    merge_stats,
    open_regular,
    sha256_file,
    shard_name,
    shard_stats,
    shard_tokens_name,
    sidecar_name,
    write_bytes_atomic,
)
from crossdiff_core.cache.lock import WriterLock
from crossdiff_core.cache.settings import claim_settings, clear_cache_files, fingerprint, writer_settings
from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.fileio import fsync_file as _fsync
from crossdiff_core.fileio import tmp_name

__all__ = ["CacheWriter"]


def _to_arrow(name: str, value: Any) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        return value.combine_chunks()
    if isinstance(value, pa.Array):
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return pa.array(value)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise CacheError(f"tokens column {name!r} cannot be converted to an Arrow array ({e}): pass a list or 1-D array") from e


def _tokens_table(tokens: Mapping[str, Any] | pa.Table, n: int, shard_index: int) -> pa.Table:
    """The per-shard token table in TOKEN_SCHEMA order (extra columns kept after it)."""
    if isinstance(tokens, pa.Table):
        cols = {name: tokens.column(name) for name in tokens.column_names}
    elif isinstance(tokens, Mapping):
        cols = dict(tokens)
    else:
        raise CacheError(f"tokens must be a dict of columns or a pyarrow.Table, got {type(tokens).__name__}")
    if "shard" in cols or "row" in cols:
        raise CacheError("tokens must not contain `shard` or `row`: the writer fills them; drop those columns")
    missing = [c for c in INPUT_COLUMNS if c not in cols]
    if missing:
        raise CacheError(f"tokens lacks columns {missing}: pass all of {list(INPUT_COLUMNS)}")
    arrays = [pa.array(np.full(n, shard_index, dtype=np.int32)), pa.array(np.arange(n, dtype=np.int32))]
    fields = list(TOKEN_SCHEMA)
    for name in list(INPUT_COLUMNS) + [c for c in cols if c not in INPUT_COLUMNS]:
        arr = _to_arrow(name, cols[name])
        if len(arr) != n:
            raise CacheError(f"tokens column {name!r} has {len(arr)} rows but the shard has {n}: pass one row per cached token")
        if name in INPUT_COLUMNS:
            want = TOKEN_SCHEMA.field(name).type
            try:
                arr = arr.cast(want, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise CacheError(f"tokens column {name!r} cannot be cast to {want} ({e}): fix its values") from e
            if arr.null_count:
                raise CacheError(f"tokens column {name!r} has {arr.null_count} nulls: every token needs a value")
        else:
            fields.append(pa.field(name, arr.type))
        arrays.append(arr)
    bad = pc.invert(pc.is_in(arrays[TOKEN_SCHEMA.get_field_index("source")], value_set=pa.array(SOURCES)))
    if pc.any(bad).as_py():
        raise CacheError(f"tokens column 'source' must hold only {list(SOURCES)}: fix the values")
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------------------------------
# writer


class CacheWriter:
    """Writes a cache shard by shard; resumable, and `finalize` builds tokens.parquet and the manifest.

    A shard is complete when its activation file, token file and sidecar exist and the file's sha256
    matches the sidecar; the sidecar is written last, so a crash leaves at worst an incomplete shard.
    `metadata` (JSON-serialisable) goes into the manifest, and its fingerprint into every sidecar.
    Keys in `resume_ignores` (by default the code version) are left out of that fingerprint, so a
    resumed run on a newer commit keeps the finished shards. Background writes: at most `max_pending`
    shards in flight. Shards with index >= n_shards at `finalize` are left alone and not listed.

    One writer per cache (`crossdiff_core.cache.lock`): the writer holds the directory's lock from here
    until `close()` or the end of `finalize()`; another writer meanwhile gets a CacheError naming it.
    `shards` marks a slice writer (it writes only those shards, alongside other slices, and cannot
    finalize). A directory holding a cache written with other settings (layer, dtype, models, data, ...;
    `crossdiff_core.cache.settings`) is refused, naming what differs, unless `overwrite=True`, which
    first deletes its cache files (whole-cache writers only). Same settings: the run resumes.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        d_model: int,
        layer: int,
        dtype: str = "bfloat16",
        metadata: dict | None = None,
        max_pending: int = 2,
        resume_ignores: tuple[str, ...] = ("code_version",),
        shards: Sequence[int] | None = None,
        overwrite: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"cache dtype {dtype!r} is not supported: use one of {list(DTYPES)}")
        if int(d_model) <= 0:
            raise ConfigError(f"d_model must be positive, got {d_model}")
        metadata = dict(metadata or {})
        clash = sorted(set(metadata) & (set(REQUIRED_KEYS) | {"format_version"}))
        if clash:
            raise ConfigError(f"metadata keys {clash} are reserved for the manifest: rename them")
        try:
            self.settings = writer_settings(d_model, layer, dtype, metadata, resume_ignores)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"metadata must be JSON-serialisable ({e}): pass plain str/int/float/list/dict values") from e
        if overwrite and shards is not None:
            raise ConfigError("overwrite clears the whole cache, so a slice writer (shards=...) cannot: overwrite "
                              "once before the slices start (or empty the directory), then run the slices")
        self.path = Path(out_dir)
        self.d_model = int(d_model)
        self.layer = int(layer)
        self.dtype = dtype
        self.metadata = metadata
        self.max_pending = max(1, int(max_pending))
        self.resume_ignores = tuple(resume_ignores)
        self.fingerprint = fingerprint(self.settings)
        try:
            (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create the cache directory {self.path} ({e.strerror}): pass an --out that is a "
                             "writable directory (or does not exist yet)") from e
        self._verified: dict[int, tuple[int, int, str]] = {}  # shard -> (size, mtime_ns, sha256) seen valid
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._invalidated = False
        if shards is None:
            self._writer_lock = WriterLock(self.path, role="cache writer")
        else:
            listed = sorted({int(i) for i in shards})
            tag = hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:12]
            shown = str(listed) if len(listed) <= 8 else f"{listed[:8]}"[:-1] + ", ...]"
            self._writer_lock = WriterLock(self.path, role=f"slice writer of shards {shown}", slice_tag=tag)
        self._overwrite = bool(overwrite)
        self._claim()

    def _claim(self) -> None:
        """Hold the writer lock (taken again after a `close`), then check and record the settings."""
        if self._writer_lock.held:
            return
        self._writer_lock.acquire()
        try:
            if self._overwrite:
                clear_cache_files(self.path)
                self._verified.clear()
            claim_settings(self.path, self.settings, self.resume_ignores, replace=self._overwrite)
            self._overwrite = False  # cleared once: a later re-claim resumes what this writer wrote
        except BaseException:
            self._writer_lock.release()
            raise

    # ---- completeness

    def _read_sidecar(self, index: int) -> dict | None:
        try:
            with os.fdopen(open_regular(self.path / sidecar_name(index)), "rb") as f:
                side = json.loads(f.read())
        except (OSError, ValueError, CacheError):  # absent, unreadable, or not a regular file: incomplete
            return None
        if not isinstance(side, dict) or side.get("fingerprint") != self.fingerprint:
            return None
        if not {"rows", "sha256", "bytes", "tokens_sha256", "stats"} <= side.keys():
            return None
        return side

    def is_complete(self, shard_index: int) -> bool:
        """True if shard `shard_index` is on disk and its sha256 matches what was recorded at write time."""
        side = self._read_sidecar(shard_index)
        if side is None:
            return False
        file = self.path / shard_name(shard_index)
        try:
            st = file.stat()
        except OSError:
            return False
        if st.st_size != side["bytes"]:
            return False
        try:
            if sha256_file(self.path / shard_tokens_name(shard_index)) != side["tokens_sha256"]:
                return False
        except (OSError, CacheError):
            return False
        with self._lock:
            seen = self._verified.get(shard_index)
        if seen != (st.st_size, st.st_mtime_ns, side["sha256"]):
            try:
                if sha256_file(file) != side["sha256"]:
                    return False
            except (OSError, CacheError):  # vanished, or not a regular file (the next write replaces it)
                return False
            with self._lock:
                self._verified[shard_index] = (st.st_size, st.st_mtime_ns, side["sha256"])
        return True

    # ---- writing

    def write_shard(
        self,
        shard_index: int,
        base: torch.Tensor,
        chat: torch.Tensor,
        tokens: Mapping[str, Any] | pa.Table,
        *,
        background: bool = False,
    ) -> concurrent.futures.Future | None:
        """Write shard `shard_index`: `base`, `chat` [n, d] (any float dtype/device), `tokens` one row per token.

        `tokens` holds sequence, position, token_id, source ("text"/"chat"), is_template, is_assistant.
        With `background=True` the cast, hashing and writing run on one background thread and a Future is
        returned; at most `max_pending` shards are in flight (this call waits for the oldest beyond
        that). Do not modify `base`/`chat` in place until the Future is done.
        """
        if int(shard_index) < 0:
            raise CacheError(f"shard_index must be >= 0, got {shard_index}")
        for name, t in (("base", base), ("chat", chat)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != self.d_model:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CacheError(f"{name} activations must be a tensor [n, {self.d_model}], got {shape}: pass one row per token")
            if not t.is_floating_point():
                raise CacheError(f"{name} activations must be floating point, got {t.dtype}")
        if base.shape[0] != chat.shape[0]:
            raise CacheError(f"base has {base.shape[0]} rows but chat has {chat.shape[0]}: both models must see the same tokens")
        table = _tokens_table(tokens, base.shape[0], int(shard_index))
        self._claim()
        job = (int(shard_index), base.detach(), chat.detach(), table)
        if not background:
            self._write(*job)
            return None
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossdiff-cache-writer")
        fut = self._executor.submit(self._write, *job)
        self._pending.append(fut)
        return fut

    def _invalidate_outputs(self) -> None:
        # Once a shard changes, an old manifest/tokens.parquet no longer describe the directory. Called
        # only once a shard has passed its checks, so a refused shard leaves a finished cache whole.
        with self._lock:
            if not self._invalidated:
                for name in (MANIFEST, TOKENS):
                    (self.path / name).unlink(missing_ok=True)
                self._invalidated = True

    def _write(self, index: int, base: torch.Tensor, chat: torch.Tensor, table: pa.Table) -> None:
        try:
            tdtype = DTYPES[self.dtype][0]
            tensors = {m: t.to(dtype=tdtype).to("cpu").contiguous() for m, t in (("base", base), ("chat", chat))}
            stats = {m: shard_stats(tensors[m]) for m in MODELS}
            for m in MODELS:
                # complete for any NaN/±inf entry, whatever the others: the sum of squares is then inf or
                # NaN (squares are >= 0, so +inf and -inf never cancel there); finite bf16/f32 never overflow it
                if not math.isfinite(stats[m]["mean_sq_norm"]):
                    bad = ~torch.isfinite(tensors[m])  # [n, d]; only on this error path
                    rows = bad.any(dim=1).nonzero().flatten()
                    hint = "; or, if bfloat16 overflowed, cache in float32" if self.dtype == "bfloat16" else ""
                    raise CacheError(f"shard {index} ({shard_name(index)}): the {m} activations hold NaN or inf "
                                     f"({int(bad.sum())} values in {rows.numel()} rows, first row {int(rows[0])}): "
                                     f"nothing was written; check the {m} model and its dtype{hint}")
            self._invalidate_outputs()
            final = self.path / shard_name(index)
            side_path = self.path / sidecar_name(index)
            side_path.unlink(missing_ok=True)  # the shard is incomplete from here until the new sidecar lands
            tmp = tmp_name(final)
            try:
                save_file(tensors, tmp)
                _fsync(tmp)
                sha = sha256_file(tmp)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            st = final.stat()
            tok_final = self.path / shard_tokens_name(index)
            tok_tmp = tmp_name(tok_final)
            try:
                pq.write_table(table, tok_tmp)
                _fsync(tok_tmp)
                tok_sha = sha256_file(tok_tmp)
                os.replace(tok_tmp, tok_final)
            finally:
                tok_tmp.unlink(missing_ok=True)
            side = {
                "file": shard_name(index),
                "rows": int(tensors["base"].shape[0]),
                "bytes": int(st.st_size),
                "sha256": sha,
                "tokens_sha256": tok_sha,
                "d_model": self.d_model,
                "layer": self.layer,
                "dtype": self.dtype,
                "fingerprint": self.fingerprint,
                "stats": stats,
            }
            write_bytes_atomic(side_path, json_bytes(side))
            with self._lock:
                self._verified[index] = (st.st_size, st.st_mtime_ns, sha)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"writing shard {index} to {self.path} failed ({type(e).__name__}: {e}): fix the cause (disk space, permissions) and re-run; complete shards are kept") from e

    def wait(self) -> None:
        """Block until every background write has finished; re-raise the first failure."""
        errors = []
        while self._pending:
            fut = self._pending.popleft()
            try:
                fut.result()
            except Exception as e:  # keep draining so no write is left running
                errors.append(e)
        if errors:
            raise errors[0]

    def _drain(self) -> None:
        """Wait for pending writes and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def close(self) -> None:
        """Wait for pending writes, stop the background thread and release the cache's writer lock."""
        try:
            self._drain()
        finally:
            self._writer_lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- finalize

    def finalize(self, n_shards: int) -> dict:
        """Check shards 0..n_shards-1 are complete, then write tokens.parquet and manifest.json; return the manifest.

        Everything is rebuilt from the sidecars on disk, merged in shard order, so a resumed run gives
        the same bytes as an uninterrupted one. Releases the writer lock at the end.
        """
        if not self._writer_lock.exclusive:
            raise ConfigError("a slice writer (shards=...) cannot finalize while other slices may be writing: "
                              "finalize with a whole-cache writer (shards=None), the merge")
        try:
            self._drain()
            self._claim()
            return self._finalize(int(n_shards))
        finally:
            self._writer_lock.release()

    def _finalize(self, n_shards: int) -> dict:
        if n_shards <= 0:
            raise CacheError(f"n_shards must be >= 1, got {n_shards}: write at least one shard before finalize")
        missing = [i for i in range(n_shards) if not self.is_complete(i)]
        if missing:
            names = ", ".join(shard_name(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise CacheError(f"{len(missing)} of {n_shards} shards in {self.path} are missing or incomplete ({names}): re-run `crossdiff cache` to write them")
        sides = [self._read_sidecar(i) for i in range(n_shards)]
        n_tokens = sum(int(s["rows"]) for s in sides)
        if n_tokens == 0:
            raise CacheError(f"all {n_shards} shards in {self.path} are empty: cache at least one token")
        self._write_tokens(n_shards)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "d_model": self.d_model,
            "layer": self.layer,
            "n_tokens": n_tokens,
            "dtype": self.dtype,
            "shards": [{"file": s["file"], "rows": int(s["rows"]), "sha256": s["sha256"]} for s in sides],
            "stats": {m: merge_stats([s["stats"][m] for s in sides]) for m in MODELS},
        }
        manifest.update(self.metadata)
        write_bytes_atomic(self.path / MANIFEST, json_bytes(manifest))
        self._invalidated = False
        self._remove_stale_temps(n_shards)
        return json.loads((self.path / MANIFEST).read_text())

    def _remove_stale_temps(self, n_shards: int) -> None:
        """Delete temp files that crashed writers left for shards 0..n_shards-1 (all complete by now)."""
        for tmp in (self.path / SHARDS_DIR).glob(".shard-*.tmp-*"):
            try:
                index = int(tmp.name[len(".shard-") :].split(".", 1)[0])
            except ValueError:
                continue
            if index < n_shards:
                tmp.unlink(missing_ok=True)

    def _write_tokens(self, n_shards: int) -> None:
        final = self.path / TOKENS
        tmp = tmp_name(final)
        writer = None
        try:
            for i in range(n_shards):
                table = pq.read_table(self.path / shard_tokens_name(i))
                if writer is None:
                    schema = table.schema.remove_metadata()
                    writer = pq.ParquetWriter(tmp, schema)
                if not table.schema.remove_metadata().equals(schema):
                    raise CacheError(f"{shard_tokens_name(i)} has columns {table.schema.names}, shard 0 has {schema.names}: every shard needs the same token columns; rewrite the odd shard")
                writer.write_table(table)
            writer.close()
            writer = None
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
