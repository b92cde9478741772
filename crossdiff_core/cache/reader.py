"""The activation cache's reader (DESIGN §2): positional reads of paired rows in bounded memory.

Rows are global token indices across shards; every read returns `[n, 2, d]` with dim 1 = (base, chat).
Any directory that follows `crossdiff_core.cache.format` opens, whoever wrote it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from crossdiff_core.cache.format import (DTYPES, EXPONENT_BITS, MANIFEST, MODELS, REBUILD, TOKENS, check_manifest, contained_file,
                                         open_regular, parse_header, read_manifest, sha256_file, torch_dtype)
from crossdiff_core.cache.shuffle import iter_shuffled, plan_shuffle
from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.normalisation import PER_MODEL, input_scales

__all__ = ["ActivationCache"]


class _Shard:
    """One shard file of a cache: header checked at open, sha256 checked per the cache's `verify`."""

    __slots__ = ("file", "rows", "sha256", "verified", "spans")

    def __init__(self, file: Path, rows: int, sha256: str | None) -> None:
        self.file = file
        self.rows = rows
        self.sha256 = sha256
        self.verified = False
        self.spans: tuple[int, int] = (0, 0)  # absolute byte offsets of the base and chat data


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
        manifest, raw = read_manifest(self.path)
        self.manifest: dict = manifest
        self.manifest_hash = hashlib.sha256(raw).hexdigest()
        check_manifest(manifest, mpath, self.path)
        self.d_model = int(manifest["d_model"])
        self.layer = int(manifest["layer"])
        self.n_tokens = int(manifest["n_tokens"])
        self._dtype_name = manifest["dtype"]
        self.dtype: torch.dtype = DTYPES[self._dtype_name][0]
        self._np_dtype = DTYPES[self._dtype_name][2]
        self._shards = []
        for i, s in enumerate(manifest["shards"]):
            file = contained_file(self.path, s["file"], f"{mpath}: shards[{i}] file")
            sh = _Shard(file, int(s["rows"]), s.get("sha256") if verify != "none" else None)
            sh.spans = parse_header(file, sh.rows, self.d_model, self._dtype_name)
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

    # ---- shard access

    def _verify(self, sh: _Shard) -> None:
        if sh.sha256 is None or sh.verified:
            return
        try:
            got = sha256_file(sh.file)
        except FileNotFoundError:
            raise CacheError(f"shard file {sh.file} is missing: re-run `crossdiff cache` to rebuild it (complete shards are kept)") from None
        if got != sh.sha256:
            raise CacheError(f"shard file {sh.file} is corrupt (sha256 {got[:12]}... but the manifest says {sh.sha256[:12]}...): {REBUILD}")
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
            fd = open_regular(sh.file)
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
                            raise CacheError(f"shard file {sh.file} is shorter than its header says (read {done} of {want} bytes): {REBUILD}")
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

    def mean_sq_norms(self) -> torch.Tensor:
        """``[2]`` float64 ``(q_base, q_chat)``, ``q_m = E||x_m||²`` over the cache (its manifest's stats)."""
        return torch.tensor([float(self.manifest["stats"][m]["mean_sq_norm"]) for m in MODELS], dtype=torch.float64)

    def scales(self, convention: str = PER_MODEL) -> torch.Tensor:
        """``[2]`` float32 ``(s_base, s_chat)`` under ``convention`` (:func:`~crossdiff_core.normalisation.input_scales`);
        the default, per_model, has ``s_m = sqrt(q_m / d_model)``, so ``E||x_m / s_m||² = d_model``."""
        return input_scales(self.mean_sq_norms(), self.d_model, convention)

    def tokens(self, columns: list[str] | None = None) -> pa.Table:
        """The per-token table (tokens.parquet), optionally only `columns`."""
        path = contained_file(self.path, TOKENS, f"activation cache {self.path}:")
        missing = f"{path} is missing: this cache has no token table; rebuild it with `crossdiff cache` to get one (activations still read fine)"
        try:
            f = os.fdopen(open_regular(path), "rb")
        except FileNotFoundError:
            raise CacheError(missing) from None
        with f:
            try:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                if columns is not None:
                    unknown = [c for c in columns if c not in schema.names]
                    if unknown:
                        raise CacheError(f"{path} has no columns {unknown}: choose from {schema.names}")
                table = pf.read(columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"{path} cannot be read ({e}): delete it and re-run `crossdiff cache` to rebuild it") from e
        if table.num_rows != self.n_tokens:
            raise CacheError(f"{path} has {table.num_rows} rows but the manifest has {self.n_tokens} tokens: delete it and re-run `crossdiff cache` to rebuild it")
        return table

    def read_rows(self, start: int, stop: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """Global rows [start, stop) as [stop-start, 2, d] in `dtype` on `device` (dim 1 = base, chat)."""
        start, stop = self._check_range(start, stop)
        out = torch.empty((stop - start, 2, self.d_model), dtype=torch_dtype(dtype))
        self._copy_into(out, start, stop)
        return out.to(device)

    def nonfinite(self) -> list[dict]:
        """Every (shard, model) holding NaN or ±inf: `{"file", "model", "count", "first_row"}` (row within the shard).

        Reads every shard once, in ~4 MiB blocks of raw bits (bounded memory, no float conversion): a
        value is non-finite exactly when all its exponent bits are set.
        """
        uint, mask = EXPONENT_BITS[self._dtype_name]
        step = self._staging_rows()
        raw = np.empty((2, min(step, max(sh.rows for sh in self._shards)), self._row_bytes), dtype=np.uint8)
        found = []
        for i, sh in enumerate(self._shards):
            count, first = np.zeros(2, dtype=np.int64), [None, None]
            for a in range(0, sh.rows, raw.shape[1]):
                k = min(raw.shape[1], sh.rows - a)
                self._read_planes(int(self._offsets[i]) + a, int(self._offsets[i]) + a + k, raw)
                bits = raw[:, :k].view(uint)  # [2, k, d]
                bad = (bits & mask) == mask  # [2, k, d]
                count += bad.sum(axis=(1, 2))
                rows = bad.any(axis=2)  # [2, k]
                for m in range(2):
                    if first[m] is None and rows[m].any():
                        first[m] = a + int(rows[m].argmax())
            found += [{"file": str(sh.file.relative_to(self.path)), "model": MODELS[m], "count": int(count[m]),
                       "first_row": first[m]} for m in range(2) if count[m]]
        return found

    def check_finite(self) -> None:
        """Raise a CacheError naming the shards unless every cached value is finite (reads the whole cache)."""
        bad = self.nonfinite()
        if bad:
            where = "; ".join(f"{b['file']} ({b['model']}: {b['count']} values, first in row {b['first_row']})" for b in bad[:6])
            more = f"; and {len(bad) - 6} more" if len(bad) > 6 else ""
            raise CacheError(f"activation cache {self.path} holds NaN or inf activations: {where}{more}: nothing can be "
                             "trained or measured on them; rebuild the cache with `crossdiff cache` (in float32 if "
                             "bfloat16 overflowed), or fix the tool that wrote it")

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

        The order is `crossdiff_core.cache.shuffle.plan_shuffle`'s, a pure function of the arguments, so
        it is deterministic and skippable: contiguous chunks of `chunk_rows` (default R/256 rows, at
        least 256 KiB per model and at most R/16 rows) in an order permuted by (seed, epoch), cut into
        buffers of R = ⌊buffer_rows / B⌋·B rows whose rows are permuted by (seed, epoch, buffer). The
        ragged tail (< B rows of the last buffer) is dropped.
        `skip_batches=n` starts at the buffer holding batch n and yields exactly what the full iterator
        would after its first n batches, reading nothing before that buffer.
        `prefetch` (default: on when `device` is not the CPU) reads the next buffer on a background
        thread while this one's batches are served: two buffers in memory instead of one.
        Memory: one (or two) buffers of R rows in the cache dtype, a copy of one on `device` if that
        is not the CPU, and the batch being built.
        """
        start, stop = self._check_range(start, stop)
        plan = plan_shuffle(stop - start, batch_size, seed=seed, epoch=epoch, buffer_rows=buffer_rows, chunk_rows=chunk_rows,
                            row_bytes=self._row_bytes, start=start, skip_batches=skip_batches)
        if not plan.buffers:
            return
        out_dtype = torch_dtype(dtype)
        device = torch.device(device)
        prefetch = device.type != "cpu" if prefetch is None else bool(prefetch)
        yield from iter_shuffled(plan, self._read_planes, d_model=self.d_model, cache_dtype=self.dtype, out_dtype=out_dtype,
                                 device=device, prefetch=prefetch)
