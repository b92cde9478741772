"""Activation cache (DESIGN §2): paired base/chat activations of one layer, sharded safetensors files.

Layout of a cache directory::

    manifest.json                         required keys: d_model, layer, n_tokens, dtype, shards, stats
    shards/shard-00000.safetensors        tensors `base` and `chat`, each [rows, d], in the cache dtype
    tokens.parquet                        one row per cached token (shard, row, sequence, position, ...)

The writer also keeps, per shard, a sidecar `shards/shard-00000.json` (rows, sha256, float64 stats) and
`shards/shard-00000.tokens.parquet`, so an interrupted run resumes without recomputing finished shards
and `finalize` rebuilds the manifest from disk alone (byte-identical whether or not the run was resumed).

Readers need only the required manifest keys: other tools write caches too.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.fileio import atomic_write, tmp_name
from crossdiff_core.fileio import fsync_file as _fsync

__all__ = ["ActivationCache", "CacheWriter", "TOKEN_SCHEMA", "cache_summary", "shard_name"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.parquet"
SHARDS_DIR = "shards"
REQUIRED_KEYS = ("d_model", "layer", "n_tokens", "dtype", "shards", "stats")
MODELS = ("base", "chat")

# cache dtype name -> (torch dtype, safetensors dtype tag, numpy dtype holding the raw bits)
_DTYPES: dict[str, tuple[torch.dtype, str, np.dtype]] = {
    "bfloat16": (torch.bfloat16, "BF16", np.dtype("<u2")),
    "float32": (torch.float32, "F32", np.dtype("<f4")),
}

TOKEN_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("sequence", pa.int64()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("source", pa.string()),
        ("is_template", pa.bool_()),
        ("is_assistant", pa.bool_()),
    ]
)
_INPUT_COLUMNS = TOKEN_SCHEMA.names[2:]  # what the caller passes; the writer fills shard and row
_SOURCES = ("text", "chat")
_STATS_BLOCK_ELEMS = 1 << 19  # float64 working block for shard stats (4 MiB: stays in cache)
_REBUILD = "delete it and re-run `crossdiff cache` to rebuild it (a re-run keeps the complete shards)"


def shard_name(index: int) -> str:
    """Relative path of shard `index`'s activation file inside a cache directory."""
    return f"{SHARDS_DIR}/shard-{index:05d}.safetensors"


def _sidecar_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.json"


def _shard_tokens_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.tokens.parquet"


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_bytes_atomic(final: Path, data: bytes) -> None:
    atomic_write(final, lambda p: Path(p).write_bytes(data), fsync=True)


def _json_bytes(obj: Any) -> bytes:
    # Fixed formatting: float64 values round-trip exactly through repr, so the bytes are reproducible.
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(f"unknown dtype {dtype!r}: pass a torch dtype such as torch.float32")


# --------------------------------------------------------------------------------------------------
# statistics


def _shard_stats(x: torch.Tensor) -> dict[str, Any]:
    """float64 count, mean vector and mean squared norm of `x` [n, d] (any float dtype, on CPU).

    numpy on fixed-size row blocks: the bits do not depend on torch's thread count, so a resumed run
    reproduces them exactly.
    """
    n, d = x.shape
    total = np.zeros(d, dtype=np.float64)
    sq = 0.0
    step = max(1, _STATS_BLOCK_ELEMS // max(d, 1))
    # All numpy (single-threaded, and no fresh pages per block): torch's multi-threaded casts stall on
    # a busy machine, and its bf16 -> f64 copy is slow. bf16 is the top half of a float32's bits.
    rows = min(step, n)
    bits = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else None
    src32 = x.numpy() if x.dtype == torch.float32 else None
    if bits is None and src32 is None:
        src32 = x.to(torch.float32).numpy()
    block_u32 = np.empty((rows, d), dtype=np.uint32)
    block64 = np.empty((rows, d), dtype=np.float64)
    for i in range(0, n, step):
        k = min(step, n - i)
        if bits is not None:
            u = block_u32[:k]
            np.copyto(u, bits[i : i + k])
            np.left_shift(u, 16, out=u)
            a32 = u.view(np.float32)
        else:
            a32 = src32[i : i + k]
        part = block64[:k]
        np.copyto(part, a32)
        total += part.sum(axis=0)
        sq += float(np.einsum("ij,ij->", part, part))
    mean = total / n if n else total
    return {"count": int(n), "mean": mean.tolist(), "mean_sq_norm": sq / n if n else 0.0}


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Chan's pairwise merge of per-shard means, in the order given (fixed order -> fixed bits)."""
    count = 0
    mean = None
    msn = 0.0
    for p in parts:
        n_b = int(p["count"])
        if n_b == 0:
            continue
        mean_b = np.asarray(p["mean"], dtype=np.float64)
        if mean is None:
            count, mean, msn = n_b, mean_b.copy(), float(p["mean_sq_norm"])
            continue
        n = count + n_b
        w = n_b / n
        mean = mean + (mean_b - mean) * w
        msn = msn + (float(p["mean_sq_norm"]) - msn) * w
        count = n
    if mean is None:
        mean = np.zeros(len(parts[0]["mean"]) if parts else 0, dtype=np.float64)
    return {"count": count, "mean": mean.tolist(), "mean_sq_norm": float(msn)}


# --------------------------------------------------------------------------------------------------
# tokens


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
    missing = [c for c in _INPUT_COLUMNS if c not in cols]
    if missing:
        raise CacheError(f"tokens lacks columns {missing}: pass all of {list(_INPUT_COLUMNS)}")
    arrays = [pa.array(np.full(n, shard_index, dtype=np.int32)), pa.array(np.arange(n, dtype=np.int32))]
    fields = list(TOKEN_SCHEMA)
    for name in list(_INPUT_COLUMNS) + [c for c in cols if c not in _INPUT_COLUMNS]:
        arr = _to_arrow(name, cols[name])
        if len(arr) != n:
            raise CacheError(f"tokens column {name!r} has {len(arr)} rows but the shard has {n}: pass one row per cached token")
        if name in _INPUT_COLUMNS:
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
    bad = pc.invert(pc.is_in(arrays[TOKEN_SCHEMA.get_field_index("source")], value_set=pa.array(_SOURCES)))
    if pc.any(bad).as_py():
        raise CacheError(f"tokens column 'source' must hold only {list(_SOURCES)}: fix the values")
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------------------------------
# writer


class CacheWriter:
    """Writes a cache shard by shard; resumable, and `finalize` builds tokens.parquet and the manifest.

    A shard is complete when its activation file, token file and sidecar exist and the file's sha256
    matches the sidecar; the sidecar is written last, so a crash leaves at worst an incomplete shard.
    `metadata` (JSON-serialisable) goes into the manifest, and its fingerprint into every sidecar: a
    re-run with different metadata (another model, data, dtype, layer) does not reuse old shards.
    Keys in `resume_ignores` (by default the code version) are left out of that fingerprint, so a
    resumed run on a newer commit keeps the finished shards. Background writes: at most `max_pending`
    shards in flight. Shards with index >= n_shards at `finalize` are left alone and not listed.
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
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"cache dtype {dtype!r} is not supported: use one of {list(_DTYPES)}")
        if int(d_model) <= 0:
            raise ConfigError(f"d_model must be positive, got {d_model}")
        metadata = dict(metadata or {})
        clash = sorted(set(metadata) & (set(REQUIRED_KEYS) | {"format_version"}))
        if clash:
            raise ConfigError(f"metadata keys {clash} are reserved for the manifest: rename them")
        try:
            meta_json = json.dumps(metadata, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"metadata must be JSON-serialisable ({e}): pass plain str/int/float/list/dict values") from e
        self.path = Path(out_dir)
        self.d_model = int(d_model)
        self.layer = int(layer)
        self.dtype = dtype
        self.metadata = metadata
        self.max_pending = max(1, int(max_pending))
        kept = {k: v for k, v in json.loads(meta_json).items() if k not in resume_ignores}
        key = json.dumps({"d_model": self.d_model, "layer": self.layer, "dtype": dtype, "metadata": kept}, sort_keys=True)
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self._verified: dict[int, tuple[int, int, str]] = {}  # shard -> (size, mtime_ns, sha256) seen valid
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._invalidated = False

    # ---- completeness

    def _read_sidecar(self, index: int) -> dict | None:
        try:
            side = json.loads((self.path / _sidecar_name(index)).read_text())
        except (OSError, ValueError):
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
            if _sha256_file(self.path / _shard_tokens_name(shard_index)) != side["tokens_sha256"]:
                return False
        except OSError:
            return False
        with self._lock:
            seen = self._verified.get(shard_index)
        if seen != (st.st_size, st.st_mtime_ns, side["sha256"]):
            if _sha256_file(file) != side["sha256"]:
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
        self._invalidate_outputs()
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
        # Once a shard changes, an old manifest/tokens.parquet no longer describe the directory.
        if not self._invalidated:
            for name in (MANIFEST, TOKENS):
                (self.path / name).unlink(missing_ok=True)
            self._invalidated = True

    def _write(self, index: int, base: torch.Tensor, chat: torch.Tensor, table: pa.Table) -> None:
        try:
            tdtype = _DTYPES[self.dtype][0]
            tensors = {m: t.to(dtype=tdtype).to("cpu").contiguous() for m, t in (("base", base), ("chat", chat))}
            stats = {m: _shard_stats(tensors[m]) for m in MODELS}
            for m in MODELS:
                if not (math.isfinite(stats[m]["mean_sq_norm"]) and np.isfinite(stats[m]["mean"]).all()):
                    raise CacheError(f"shard {index}: the {m} activations hold NaN or inf (overflow in {self.dtype}?): check the model and its dtype, or cache in float32")
            final = self.path / shard_name(index)
            side_path = self.path / _sidecar_name(index)
            side_path.unlink(missing_ok=True)  # the shard is incomplete from here until the new sidecar lands
            tmp = tmp_name(final)
            try:
                save_file(tensors, tmp)
                _fsync(tmp)
                sha = _sha256_file(tmp)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            st = final.stat()
            tok_final = self.path / _shard_tokens_name(index)
            tok_tmp = tmp_name(tok_final)
            try:
                pq.write_table(table, tok_tmp)
                _fsync(tok_tmp)
                tok_sha = _sha256_file(tok_tmp)
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
            _write_bytes_atomic(side_path, _json_bytes(side))
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

    def close(self) -> None:
        """Wait for pending writes and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- finalize

    def finalize(self, n_shards: int) -> dict:
        """Check shards 0..n_shards-1 are complete, then write tokens.parquet and manifest.json; return the manifest.

        Everything is rebuilt from the sidecars on disk, merged in shard order, so a resumed run gives
        the same bytes as an uninterrupted one.
        """
        self.close()
        n_shards = int(n_shards)
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
            "stats": {m: _merge_stats([s["stats"][m] for s in sides]) for m in MODELS},
        }
        manifest.update(self.metadata)
        _write_bytes_atomic(self.path / MANIFEST, _json_bytes(manifest))
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
                table = pq.read_table(self.path / _shard_tokens_name(i))
                if writer is None:
                    schema = table.schema.remove_metadata()
                    writer = pq.ParquetWriter(tmp, schema)
                if not table.schema.remove_metadata().equals(schema):
                    raise CacheError(f"{_shard_tokens_name(i)} has columns {table.schema.names}, shard 0 has {schema.names}: every shard needs the same token columns; rewrite the odd shard")
                writer.write_table(table)
            writer.close()
            writer = None
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# reader


class _Shard:
    """One shard file of a cache: header checked at open, sha256 checked per the cache's `verify`."""

    __slots__ = ("file", "rows", "sha256", "verified", "spans")

    def __init__(self, file: Path, rows: int, sha256: str | None) -> None:
        self.file = file
        self.rows = rows
        self.sha256 = sha256
        self.verified = False
        self.spans: tuple[int, int] = (0, 0)  # absolute byte offsets of the base and chat data


def _parse_header(file: Path, rows: int, d: int, dtype: str) -> tuple[int, int]:
    """Check a shard's safetensors header against the manifest; return the absolute byte offsets of base, chat."""
    st_tag, itemsize = _DTYPES[dtype][1], _DTYPES[dtype][2].itemsize
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CacheError(f"shard file {file} is truncated ({size} bytes): {_REBUILD}")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CacheError(f"shard file {file} has a bad safetensors header (length {n}, file {size} bytes): {_REBUILD}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CacheError(f"shard file {file} is missing: re-run `crossdiff cache` to rebuild it (complete shards are kept)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"shard file {file} cannot be read as safetensors ({e}): {_REBUILD}") from e
    if not isinstance(header, dict):
        raise CacheError(f"shard file {file} has a bad safetensors header (not a JSON object): {_REBUILD}")
    spans = {}
    for m in MODELS:
        info = header.get(m)
        if not isinstance(info, dict):
            raise CacheError(f"shard file {file} has no tensor {m!r} (has {sorted(k for k in header if k != '__metadata__')}): {_REBUILD}")
        if info.get("dtype") != st_tag:
            raise CacheError(f"shard file {file} stores {m!r} as {info.get('dtype')} but the manifest says {dtype} ({st_tag}): {_REBUILD}")
        if list(info.get("shape", [])) != [rows, d]:
            raise CacheError(f"shard file {file} has {m!r} of shape {info.get('shape')} but the manifest says [{rows}, {d}]: {_REBUILD}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(v, int) for v in offsets)):
            raise CacheError(f"shard file {file} has bad data_offsets {offsets!r} for {m!r}: {_REBUILD}")
        start, stop = 8 + n + offsets[0], 8 + n + offsets[1]
        if stop - start != rows * d * itemsize or stop > size:
            raise CacheError(f"shard file {file} is truncated or inconsistent (tensor {m!r} bytes {start}..{stop}, file {size} bytes): {_REBUILD}")
        spans[m] = start
    return spans["base"], spans["chat"]


class ActivationCache:
    """Reads an activation cache in bounded memory.

    Rows are global token indices across shards; every read returns `[n, 2, d]` with dim 1 = (base, chat).
    `verify`: "full" hashes every shard now, "lazy" hashes each shard the first time it is read, "none".
    Shard data is read with positional reads (`os.preadv`) straight from the page cache into the
    caller's buffer: measured ~3x faster than copying out of a memory map whose pages are dropped
    after use, and unlike a map that keeps its pages, resident memory does not grow with the cache.
    At most `max_open_files` shard files are open at once.
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "lazy", max_open_files: int = 64) -> None:
        if verify not in ("full", "lazy", "none"):
            raise ConfigError(f"verify must be 'full', 'lazy' or 'none', got {verify!r}")
        self.path = Path(path)
        self.verify = verify
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise CacheError(f"activation cache {self.path} does not exist: run `crossdiff cache` to build it, or fix the path")
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{mpath} is missing (the cache was never finalized): re-run `crossdiff cache` to finish it") from None
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise CacheError(f"{mpath} is not valid JSON ({e}): delete it and re-run `crossdiff cache` to rebuild it") from e
        self.manifest: dict = manifest
        self.manifest_hash = hashlib.sha256(raw).hexdigest()
        self._check_manifest(mpath)
        self.d_model = int(manifest["d_model"])
        self.layer = int(manifest["layer"])
        self.n_tokens = int(manifest["n_tokens"])
        self._dtype_name = manifest["dtype"]
        self.dtype: torch.dtype = _DTYPES[self._dtype_name][0]
        self._np_dtype = _DTYPES[self._dtype_name][2]
        self._shards = []
        for s in manifest["shards"]:
            file = self.path / s["file"]
            sh = _Shard(file, int(s["rows"]), s.get("sha256") if verify != "none" else None)
            sh.spans = _parse_header(file, sh.rows, self.d_model, self._dtype_name)
            self._shards.append(sh)
        rows = np.array([sh.rows for sh in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(rows)])  # shard i holds global rows [off[i], off[i+1])
        self._row_bytes = self.d_model * self._np_dtype.itemsize  # one row of one model
        self._lock = threading.Lock()  # guards the open-file table and lazy verification
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._max_open = max(1, int(max_open_files))
        if verify == "full":
            for sh in self._shards:
                self._verify(sh)

    def _check_manifest(self, mpath: Path) -> None:
        m = self.manifest
        fix = "rebuild the cache with `crossdiff cache`, or fix the tool that wrote it"
        if not isinstance(m, dict):
            raise CacheError(f"{mpath} must hold a JSON object: {fix}")
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if missing:
            raise CacheError(f"{mpath} lacks required keys {missing}: {fix}")
        for k in ("d_model", "layer", "n_tokens"):
            if not isinstance(m[k], int) or isinstance(m[k], bool):
                raise CacheError(f"{mpath}: {k!r} must be an integer, got {m[k]!r}: {fix}")
        if m["d_model"] <= 0:
            raise CacheError(f"{mpath}: d_model must be positive, got {m['d_model']}: {fix}")
        if m["dtype"] not in _DTYPES:
            raise CacheError(f"{mpath}: dtype {m['dtype']!r} is not supported (use {list(_DTYPES)}): {fix}")
        shards = m["shards"]
        if not isinstance(shards, list) or not shards:
            raise CacheError(f"{mpath}: 'shards' must be a non-empty list: {fix}")
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("rows"), int) or s["rows"] < 0:
                raise CacheError(f"{mpath}: shards[{i}] must have 'file' (str) and 'rows' (int >= 0): {fix}")
            if not isinstance(s.get("sha256"), str):
                raise CacheError(f"{mpath}: shards[{i}] ({s['file']}) lacks its 'sha256': {fix}")
        total = sum(s["rows"] for s in shards)
        if total != m["n_tokens"]:
            raise CacheError(f"{mpath}: shard rows sum to {total} but n_tokens is {m['n_tokens']}: {fix}")
        if m["n_tokens"] == 0:
            raise CacheError(f"activation cache {self.path} is empty (n_tokens = 0): re-run `crossdiff cache` with some data")
        stats = m["stats"]
        for model in MODELS:
            st = stats.get(model) if isinstance(stats, dict) else None
            if not isinstance(st, dict) or "mean" not in st or "mean_sq_norm" not in st:
                raise CacheError(f"{mpath}: stats.{model} must have 'mean' and 'mean_sq_norm': {fix}")
            if len(st["mean"]) != m["d_model"]:
                raise CacheError(f"{mpath}: stats.{model}.mean has {len(st['mean'])} values, d_model is {m['d_model']}: {fix}")
            v = st["mean_sq_norm"]
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CacheError(f"{mpath}: stats.{model}.mean_sq_norm must be a positive number, got {v!r}: {fix}")

    # ---- shard access

    def _verify(self, sh: _Shard) -> None:
        if sh.sha256 is None or sh.verified:
            return
        try:
            got = _sha256_file(sh.file)
        except FileNotFoundError:
            raise CacheError(f"shard file {sh.file} is missing: re-run `crossdiff cache` to rebuild it (complete shards are kept)") from None
        if got != sh.sha256:
            raise CacheError(f"shard file {sh.file} is corrupt (sha256 {got[:12]}... but the manifest says {sh.sha256[:12]}...): {_REBUILD}")
        sh.verified = True

    def _fd(self, i: int) -> int:
        """An open descriptor for shard i (call with self._lock held); verifies the shard on first use."""
        fd = self._fds.get(i)
        if fd is not None:
            self._fds.move_to_end(i)
            return fd
        sh = self._shards[i]
        self._verify(sh)
        try:
            fd = os.open(sh.file, os.O_RDONLY)
        except FileNotFoundError:
            raise CacheError(f"shard file {sh.file} is missing: re-run `crossdiff cache` to rebuild it (complete shards are kept)") from None
        self._fds[i] = fd
        while len(self._fds) > self._max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """Split global rows [start, stop) into (shard, row_lo, row_hi, out_offset) pieces."""
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            while self._offsets[i + 1] <= pos:
                i += 1
            lo = pos - int(self._offsets[i])
            hi = min(stop, int(self._offsets[i + 1])) - int(self._offsets[i])
            yield i, lo, hi, pos - start
            pos += hi - lo

    def _read_planes(self, start: int, stop: int, dst: np.ndarray) -> None:
        """Read global rows [start, stop) into `dst`, uint8 [2, >= stop-start, row_bytes] (planes base, chat)."""
        rb = self._row_bytes
        for i, lo, hi, o in self._pieces(start, stop):
            sh = self._shards[i]
            want = (hi - lo) * rb
            with self._lock:
                fd = self._fd(i)
                for m, offset in enumerate(sh.spans):
                    view = memoryview(dst[m, o : o + hi - lo]).cast("B")
                    at, done = offset + lo * rb, 0
                    while done < want:  # a read may return less than asked (e.g. > 2 GiB at once)
                        got = os.preadv(fd, [view[done:]], at + done)
                        if got <= 0:
                            raise CacheError(f"shard file {sh.file} is shorter than its header says (read {done} of {want} bytes): {_REBUILD}")
                        done += got

    def _staging(self, rows: int) -> tuple[torch.Tensor, np.ndarray]:
        """A [2, rows, d] cache-dtype tensor and its uint8 numpy view for `_read_planes`."""
        t = torch.empty((2, rows, self.d_model), dtype=self.dtype)
        return t, t.view(torch.uint8).numpy()

    def _staging_rows(self) -> int:
        return max(16, (4 << 20) // (2 * self._row_bytes))  # ~4 MiB: stays in cache between read and copy

    def _copy_into(self, out: torch.Tensor, start: int, stop: int, staging: tuple[torch.Tensor, np.ndarray] | None = None) -> None:
        """Copy global rows [start, stop) into `out` [stop-start, 2, d] (any dtype; converts)."""
        if stop <= start:
            return
        if staging is None:
            staging = self._staging(min(stop - start, self._staging_rows()))
        t, raw = staging
        step = t.shape[1]
        for a in range(start, stop, step):
            k = min(step, stop - a)
            self._read_planes(a, a + k, raw)
            out[a - start : a - start + k].copy_(t[:, :k].transpose(0, 1))

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_tokens if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= self.n_tokens:
            raise ConfigError(f"row range [{start}, {stop}) is outside the cache's [0, {self.n_tokens}): pass 0 <= start <= stop <= n_tokens")
        return start, stop

    # ---- public API

    def __len__(self) -> int:
        return self.n_tokens

    def close(self) -> None:
        """Close the open shard files (they are reopened on the next read)."""
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])

    def __getstate__(self) -> dict:
        # Picklable (DataLoader workers, spawn): open files and the lock are per process.
        state = self.__dict__.copy()
        state["_fds"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        while fds:
            os.close(fds.popitem()[1])

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scales(self) -> torch.Tensor:
        """[2] float32 (s_base, s_chat) with s_m = sqrt(mean_sq_norm_m / d_model), so E||x_m / s_m||² = d_model."""
        msn = torch.tensor([float(self.manifest["stats"][m]["mean_sq_norm"]) for m in MODELS], dtype=torch.float64)
        return (msn / self.d_model).sqrt().to(torch.float32)

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        """The per-token table (tokens.parquet), optionally only `columns`."""
        path = self.path / TOKENS
        if not path.exists():
            raise CacheError(f"{path} is missing: this cache has no token table; rebuild it with `crossdiff cache` to get one (activations still read fine)")
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise CacheError(f"{path} cannot be read ({e}): delete it and re-run `crossdiff cache` to rebuild it") from e
        if columns is not None:
            unknown = [c for c in columns if c not in schema.names]
            if unknown:
                raise CacheError(f"{path} has no columns {unknown}: choose from {schema.names}")
        table = pq.read_table(path, columns=columns)
        if table.num_rows != self.n_tokens:
            raise CacheError(f"{path} has {table.num_rows} rows but the manifest has {self.n_tokens} tokens: delete it and re-run `crossdiff cache` to rebuild it")
        return table

    def read_rows(self, start: int, stop: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Global rows [start, stop) as [stop-start, 2, d] in `dtype` on `device` (dim 1 = base, chat)."""
        start, stop = self._check_range(start, stop)
        out = torch.empty((stop - start, 2, self.d_model), dtype=_torch_dtype(dtype))
        self._copy_into(out, start, stop)
        return out.to(device)

    def iter_sequential(
        self, batch_size: int, *, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(global start row, batch [n, 2, d]) over [start, stop) in order; the last batch may be short."""
        start, stop = self._check_range(start, stop)
        if int(batch_size) <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        for a in range(start, stop, int(batch_size)):
            b = min(stop, a + int(batch_size))
            yield a, self.read_rows(a, b, dtype=dtype, device=device)

    def batches_per_epoch(self, batch_size: int, *, start: int = 0, stop: int | None = None) -> int:
        """Number of full batches `shuffled_batches` yields per epoch over [start, stop)."""
        start, stop = self._check_range(start, stop)
        if int(batch_size) <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        return (stop - start) // int(batch_size)

    def shuffled_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        skip_batches: int = 0,
        start: int = 0,
        stop: int | None = None,
        buffer_rows: int = 262144,
        chunk_rows: int | None = None,
        prefetch: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Iterator[torch.Tensor]:
        """One epoch of full batches [B, 2, d] over global rows [start, stop), shuffled across shards.

        Plan (a pure function of the arguments, so it is deterministic and skippable): rows are cut into
        contiguous chunks of `chunk_rows` (default R/256 rows, at least 256 KiB per model and at most
        R/16 rows); the chunk order is permuted by (seed, epoch); the resulting row stream is cut into
        buffers of R = ⌊buffer_rows / B⌋·B rows; each buffer is read chunk by chunk and its rows
        permuted by (seed, epoch, buffer). The ragged tail (< B rows of the last buffer) is dropped.
        `skip_batches=n` starts at the buffer holding batch n and yields exactly what the full iterator
        would after its first n batches, reading nothing before that buffer.
        `prefetch` (default: on when `device` is not the CPU) reads the next buffer on a background
        thread while this one's batches are served: two buffers in memory instead of one.
        Memory: one (or two) buffers of R rows in the cache dtype, a copy of one on `device` if that
        is not the CPU, and the batch being built.
        """
        start, stop = self._check_range(start, stop)
        B = int(batch_size)
        if B <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if int(buffer_rows) < B:
            raise ConfigError(f"buffer_rows ({buffer_rows}) must be >= batch_size ({B}): raise buffer_rows or lower batch_size")
        if int(seed) < 0 or int(epoch) < 0:
            raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        n_rows = stop - start
        skip = int(skip_batches)
        if skip < 0:
            raise ConfigError(f"skip_batches must be >= 0, got {skip_batches}")
        if skip >= n_rows // B:
            return
        R = (int(buffer_rows) // B) * B
        if chunk_rows is None:
            # >= 256 KiB per read (smaller preads cost more per byte), >= 16 chunks mixed per buffer
            C = max(1, min(max(R // 256, (256 << 10) // self._row_bytes), R // 16))
        else:
            C = int(chunk_rows)
        if C <= 0:
            raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
        out_dtype = _torch_dtype(dtype)
        device = torch.device(device)
        prefetch = device.type != "cpu" if prefetch is None else bool(prefetch)

        n_chunks = -(-n_rows // C)
        order = np.random.default_rng([int(seed), int(epoch), 0]).permutation(n_chunks)
        lens = np.full(n_chunks, C, dtype=np.int64)
        lens[-1] = n_rows - C * (n_chunks - 1)
        stream = np.concatenate([[0], np.cumsum(lens[order])])  # stream offset of the j-th chunk in order
        starts = start + order.astype(np.int64) * C  # global first row of the j-th chunk in order
        per_buffer = R // B
        first, last = skip // per_buffer, n_rows // R + (n_rows % R >= B)  # buffers [first, last) yield

        def fill(k: int, raw: np.ndarray) -> int:
            """Read buffer k (stream rows [kR, kR+L)) into planes `raw` [2, >= L, row_bytes]; return L."""
            s0, s1 = k * R, min((k + 1) * R, n_rows)
            j = int(np.searchsorted(stream, s0, side="right")) - 1
            pos = s0
            while pos < s1:
                n = min(int(stream[j + 1]), s1) - pos
                g = int(starts[j]) + pos - int(stream[j])
                self._read_planes(g, g + n, raw[:, pos - s0 : pos - s0 + n])
                pos += n
                j += 1
            return s1 - s0

        # Planes [2, R, d] (base, chat): chunks are read straight into them, with no staging copy.
        shape = (2, min(R, n_rows), self.d_model)
        bufs = [torch.empty(shape, dtype=self.dtype, pin_memory=device.type == "cuda") for _ in range(1 + prefetch)]
        raws = [b.view(torch.uint8).numpy() for b in bufs]
        rows = torch.empty((2, B, self.d_model), dtype=self.dtype, device=device)  # gathered, before conversion
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crossdiff-cache-prefetch") if prefetch else None
        try:
            pending = pool.submit(fill, first, raws[0]) if pool else None
            for k in range(first, last):
                slot = (k - first) % len(bufs)
                L = pending.result() if pool else fill(k, raws[slot])
                if pool and k + 1 < last:
                    pending = pool.submit(fill, k + 1, raws[(k + 1 - first) % len(bufs)])
                perm = torch.from_numpy(np.random.default_rng([int(seed), int(epoch), 1, k]).permutation(L)).to(device)
                # On an accelerator the buffer moves once (a blocking copy: its slot is refilled later)
                # and the batches are gathered there.
                data = None
                data = bufs[slot][:, :L] if device.type == "cpu" else bufs[slot][:, :L].to(device)
                for b in range(skip - k * per_buffer if k == first else 0, L // B):
                    idx = perm[b * B : (b + 1) * B]
                    for m in range(2):
                        torch.index_select(data[m], 0, idx, out=rows[m])
                    out = torch.empty((B, 2, self.d_model), dtype=out_dtype, device=device)
                    out.copy_(rows.transpose(0, 1))
                    yield out
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)  # the reader writes into our buffers

def cache_summary(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """What `crossdiff cache-info` prints: shape, size, scales, token counts, and whether checksums match."""
    cache = ActivationCache(path, verify="full" if verify else "none")
    m = cache.manifest
    size = sum((cache.path / s["file"]).stat().st_size for s in m["shards"])
    out: dict[str, Any] = {
        "path": str(cache.path),
        "manifest_sha256": cache.manifest_hash,
        "d_model": cache.d_model,
        "layer": cache.layer,
        "dtype": m["dtype"],
        "n_tokens": cache.n_tokens,
        "shards": len(m["shards"]),
        "bytes": size,
        "checksums": "verified" if verify else "not checked",
        "scales": dict(zip(MODELS, cache.scales().tolist())),
        "mean_norm": {k: float(np.linalg.norm(m["stats"][k]["mean"])) for k in MODELS},
    }
    if (cache.path / TOKENS).exists():
        t = cache.tokens(["source", "is_template", "is_assistant", "sequence"])
        out["tokens"] = {
            "by_source": {str(r["values"]): int(r["counts"]) for r in pc.value_counts(t.column("source")).to_pylist()},
            "template": int(pc.sum(t.column("is_template")).as_py() or 0),
            "assistant": int(pc.sum(t.column("is_assistant")).as_py() or 0),
            "sequences": int(pc.count_distinct(t.column("sequence")).as_py()),
        }
    else:
        out["tokens"] = None
    out["metadata"] = {k: v for k, v in m.items() if k not in REQUIRED_KEYS}
    return out
