"""The activation cache's on-disk format (DESIGN §2): names, dtypes, schemas, checksums and statistics.

Layout of a cache directory::

    manifest.json                         required keys: d_model, layer, n_tokens, dtype, shards, stats
    shards/shard-00000.safetensors        tensors `base` and `chat`, each [rows, d], in the cache dtype
    tokens.parquet                        one row per cached token (shard, row, sequence, position, ...)

The writer also keeps, per shard, a sidecar `shards/shard-00000.json` (rows, sha256, float64 stats) and
`shards/shard-00000.tokens.parquet`, so an interrupted run resumes without recomputing finished shards
and `finalize` rebuilds the manifest from disk alone (byte-identical whether or not the run was resumed).

Readers need only the required manifest keys: other tools write caches too. This module is what the
writer and the reader agree on; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.fileio import atomic_write

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.parquet"
SHARDS_DIR = "shards"
REQUIRED_KEYS = ("d_model", "layer", "n_tokens", "dtype", "shards", "stats")
MODELS = ("base", "chat")

# cache dtype name -> (torch dtype, safetensors dtype tag, numpy dtype holding the raw bits)
DTYPES: dict[str, tuple[torch.dtype, str, np.dtype]] = {
    "bfloat16": (torch.bfloat16, "BF16", np.dtype("<u2")),
    "float32": (torch.float32, "F32", np.dtype("<f4")),
}

# cache dtype name -> (unsigned view of the raw bits, exponent mask): a value is NaN or +-inf exactly
# when all its exponent bits are set, so raw shard bytes are checked without converting them
EXPONENT_BITS: dict[str, tuple[np.dtype, int]] = {
    "bfloat16": (np.dtype("<u2"), 0x7F80),
    "float32": (np.dtype("<u4"), 0x7F800000),
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
INPUT_COLUMNS = TOKEN_SCHEMA.names[2:]  # what the caller passes; the writer fills shard and row
SOURCES = ("text", "chat")
REBUILD = "delete it and re-run `crossdiff cache` to rebuild it (a re-run keeps the complete shards)"
_STATS_BLOCK_ELEMS = 1 << 19  # float64 working block for shard stats (4 MiB: stays in cache)


def shard_name(index: int) -> str:
    """Relative path of shard `index`'s activation file inside a cache directory."""
    return f"{SHARDS_DIR}/shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    """Relative path of shard `index`'s sidecar (rows, checksums, stats; written last)."""
    return f"{SHARDS_DIR}/shard-{index:05d}.json"


def shard_tokens_name(index: int) -> str:
    """Relative path of shard `index`'s token table (merged into tokens.parquet by `finalize`)."""
    return f"{SHARDS_DIR}/shard-{index:05d}.tokens.parquet"


def sha256_file(path: Path) -> str:
    with os.fdopen(open_regular(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------------
# a cache reads only its own files: regular files inside its directory


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: Path) -> int:
    """A read-only fd of `path`, refused (CacheError) unless it is a regular file.

    Opened non-blocking and checked with fstat on the open fd, so a FIFO put in a shard's place (or
    swapped in after a check by path) is refused at once instead of hanging the reader.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CacheError(f"{path} is {_kind(mode)}, not a regular file: a cache reads only regular files; {REBUILD}")
    return fd


def check_relative(rel: Any, ref: str) -> None:
    """Refuse a file name that is not relative to the cache directory; `ref` names where it was found."""
    fix = "a cache reads only files inside its own directory: list them relative to it (e.g. 'shards/shard-00000.safetensors'), or rebuild the cache with `crossdiff cache`"
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CacheError(f"{ref} {rel!r} is not a file name: {fix}")
    p = PurePosixPath(rel)
    if p.is_absolute():
        raise CacheError(f"{ref} {rel!r} is an absolute path: {fix}")
    if ".." in p.parts:
        raise CacheError(f"{ref} {rel!r} contains '..' (it may climb out of the cache directory): {fix}")


def contained_file(root: Path, rel: str, ref: str) -> Path:
    """`root / rel`, refused (CacheError naming `ref`) unless it resolves inside `root` to a regular file.

    Symlinks are followed, and may point anywhere inside `root`. A missing file passes (callers report it).
    """
    check_relative(rel, ref)
    path = root / rel
    try:
        real, top = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CacheError(f"{ref} {rel!r} cannot be resolved ({e}): replace it with a regular file, or {REBUILD}") from e
    if not real.is_relative_to(top):
        raise CacheError(f"{ref} {rel!r} resolves to {real}, outside the cache directory {top}: a cache reads only its own "
                         "files; copy the file into the cache (for DVC: `dvc config cache.type reflink,copy`), or rebuild it with `crossdiff cache`")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise CacheError(f"{ref} {rel!r} cannot be read ({e.strerror}): fix its permissions, or {REBUILD}") from e
    if not stat.S_ISREG(mode):
        raise CacheError(f"{ref} {rel!r} is {_kind(mode)}, not a regular file: a cache reads only regular files; "
                         f"put the file there, or {REBUILD}")
    return path


def write_bytes_atomic(final: Path, data: bytes) -> None:
    atomic_write(final, lambda p: Path(p).write_bytes(data), fsync=True)


def json_bytes(obj: Any) -> bytes:
    # Fixed formatting: float64 values round-trip exactly through repr, so the bytes are reproducible.
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name (``"float32"``), as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ConfigError(f"unknown dtype {dtype!r}: pass a torch dtype such as torch.float32")


# --------------------------------------------------------------------------------------------------
# statistics


def shard_stats(x: torch.Tensor) -> dict[str, Any]:
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
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: the writer reports them, numpy need not warn
            total += part.sum(axis=0)
            sq += float(np.einsum("ij,ij->", part, part))
    mean = total / n if n else total
    return {"count": int(n), "mean": mean.tolist(), "mean_sq_norm": sq / n if n else 0.0}


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
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
# checking what is on disk


def read_manifest(cache_path: Path) -> tuple[Any, bytes]:
    """The parsed manifest.json of `cache_path` and its raw bytes (not yet checked: see `check_manifest`).

    A CacheError names the fix when it is missing, not JSON, or not a regular file inside the cache
    (so nothing ever blocks on a FIFO). Whoever reads a manifest without opening the cache uses this.
    """
    mpath = Path(cache_path) / MANIFEST
    try:
        contained_file(Path(cache_path), MANIFEST, f"activation cache {cache_path}:")
        with os.fdopen(open_regular(mpath), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CacheError(f"{mpath} is missing (the cache was never finalized): re-run `crossdiff cache` to finish it") from None
    except OSError as e:
        raise CacheError(f"{mpath} cannot be read ({e.strerror or e}): fix its permissions, or {REBUILD}") from e
    try:
        return json.loads(raw), raw
    except ValueError as e:
        raise CacheError(f"{mpath} is not valid JSON ({e}): delete it and re-run `crossdiff cache` to rebuild it") from e


def check_manifest(m: Any, mpath: Path, cache_path: Path) -> None:
    """Raise a CacheError naming the fix unless `m` (manifest.json at `mpath`) is a readable manifest."""
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
    if m["dtype"] not in DTYPES:
        raise CacheError(f"{mpath}: dtype {m['dtype']!r} is not supported (use {list(DTYPES)}): {fix}")
    shards = m["shards"]
    if not isinstance(shards, list) or not shards:
        raise CacheError(f"{mpath}: 'shards' must be a non-empty list: {fix}")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("rows"), int) or s["rows"] < 0:
            raise CacheError(f"{mpath}: shards[{i}] must have 'file' (str) and 'rows' (int >= 0): {fix}")
        if not isinstance(s.get("sha256"), str):
            raise CacheError(f"{mpath}: shards[{i}] ({s['file']}) lacks its 'sha256': {fix}")
        check_relative(s["file"], f"{mpath}: shards[{i}] file")
    total = sum(s["rows"] for s in shards)
    if total != m["n_tokens"]:
        raise CacheError(f"{mpath}: shard rows sum to {total} but n_tokens is {m['n_tokens']}: {fix}")
    if m["n_tokens"] == 0:
        raise CacheError(f"activation cache {cache_path} is empty (n_tokens = 0): re-run `crossdiff cache` with some data")
    stats = m["stats"]
    for model in MODELS:
        st = stats.get(model) if isinstance(stats, dict) else None
        if not isinstance(st, dict) or "mean" not in st or "mean_sq_norm" not in st:
            raise CacheError(f"{mpath}: stats.{model} must have 'mean' and 'mean_sq_norm': {fix}")
        mean = st["mean"]
        if not isinstance(mean, list) or len(mean) != m["d_model"]:
            n = len(mean) if isinstance(mean, list) else type(mean).__name__
            raise CacheError(f"{mpath}: stats.{model}.mean has {n} values, d_model is {m['d_model']}: {fix}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean):
            raise CacheError(f"{mpath}: stats.{model}.mean holds non-numbers or NaN/inf (the activations are not finite): {fix}")
        v = st["mean_sq_norm"]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CacheError(f"{mpath}: stats.{model}.mean_sq_norm must be a positive number, got {v!r}: {fix}")


def parse_header(file: Path, rows: int, d: int, dtype: str) -> tuple[int, int]:
    """Check a shard's safetensors header against the manifest; return the absolute byte offsets of base, chat."""
    st_tag, itemsize = DTYPES[dtype][1], DTYPES[dtype][2].itemsize
    try:
        fd = open_regular(file)
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CacheError(f"shard file {file} is truncated ({size} bytes): {REBUILD}")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CacheError(f"shard file {file} has a bad safetensors header (length {n}, file {size} bytes): {REBUILD}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CacheError(f"shard file {file} is missing: re-run `crossdiff cache` to rebuild it (complete shards are kept)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"shard file {file} cannot be read as safetensors ({e}): {REBUILD}") from e
    if not isinstance(header, dict):
        raise CacheError(f"shard file {file} has a bad safetensors header (not a JSON object): {REBUILD}")
    spans = {}
    for m in MODELS:
        info = header.get(m)
        if not isinstance(info, dict):
            raise CacheError(f"shard file {file} has no tensor {m!r} (has {sorted(k for k in header if k != '__metadata__')}): {REBUILD}")
        if info.get("dtype") != st_tag:
            raise CacheError(f"shard file {file} stores {m!r} as {info.get('dtype')} but the manifest says {dtype} ({st_tag}): {REBUILD}")
        if list(info.get("shape", [])) != [rows, d]:
            raise CacheError(f"shard file {file} has {m!r} of shape {info.get('shape')} but the manifest says [{rows}, {d}]: {REBUILD}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(v, int) for v in offsets)):
            raise CacheError(f"shard file {file} has bad data_offsets {offsets!r} for {m!r}: {REBUILD}")
        start, stop = 8 + n + offsets[0], 8 + n + offsets[1]
        if stop - start != rows * d * itemsize or stop > size:
            raise CacheError(f"shard file {file} is truncated or inconsistent (tensor {m!r} bytes {start}..{stop}, file {size} bytes): {REBUILD}")
        spans[m] = start
    return spans["base"], spans["chat"]
