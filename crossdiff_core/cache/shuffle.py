"""Shuffled batches from an activation cache: the plan (a pure function) and the buffered iterator.

The plan: rows [start, start + n_rows) are cut into contiguous chunks of C rows; the chunk order is
permuted by (seed, epoch); the resulting row stream is cut into buffers of R = ⌊buffer_rows / B⌋·B
rows; buffer k is read chunk piece by chunk piece and its L rows are permuted by (seed, epoch, k);
batch b of buffer k is rows perm[bB : (b+1)B] of it. The ragged tail (< B rows of the last buffer) is
dropped. Skipping n batches starts at the buffer holding batch n, reading nothing before it.

Nothing here reads a file: the iterator is handed the reader's `read_planes(start, stop, dst)`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from crossdiff_core.errors import ConfigError

ReadPlanes = Callable[[int, int, np.ndarray], None]  # global rows [start, stop) -> uint8 [2, stop-start, row_bytes]


class ShufflePlan(NamedTuple):
    """Which rows one shuffled epoch reads, in which order; see the module docstring for the maths.

    `buffers` is empty when nothing is left to yield (no full batch, or every batch skipped); the
    chunk fields are then empty too.
    """

    n_rows: int  # rows in the epoch's range
    start: int  # global index of its first row
    batch_size: int  # B
    buffer_rows: int  # R, a multiple of B
    chunk_rows: int  # C
    seed: int
    epoch: int
    skip_batches: int  # batches of the full epoch not yielded
    chunk_starts: np.ndarray  # int64 [n_chunks]: global first row of the j-th chunk in shuffled order
    stream: np.ndarray  # int64 [n_chunks + 1]: stream offset of the j-th chunk in shuffled order
    buffers: range  # buffer indices that yield at least one batch

    @property
    def batches_per_buffer(self) -> int:
        return self.buffer_rows // self.batch_size

    def buffer_len(self, k: int) -> int:
        """L: rows in buffer k (R, or fewer for the last buffer)."""
        return min((k + 1) * self.buffer_rows, self.n_rows) - k * self.buffer_rows

    def reads(self, k: int) -> Iterator[tuple[int, int, int]]:
        """(global first row, rows, offset in the buffer) of each contiguous read that fills buffer k."""
        s0, s1 = k * self.buffer_rows, min((k + 1) * self.buffer_rows, self.n_rows)
        j = int(np.searchsorted(self.stream, s0, side="right")) - 1
        pos = s0
        while pos < s1:
            n = min(int(self.stream[j + 1]), s1) - pos
            yield int(self.chunk_starts[j]) + pos - int(self.stream[j]), n, pos - s0
            pos += n
            j += 1

    def permutation(self, k: int) -> np.ndarray:
        """int64 [L]: the order in which buffer k's rows are served."""
        return np.random.default_rng([int(self.seed), int(self.epoch), 1, k]).permutation(self.buffer_len(k))

    def first_batch(self, k: int) -> int:
        """Index, within buffer k, of its first batch that is yielded (> 0 only in the first buffer)."""
        return self.skip_batches - k * self.batches_per_buffer if k == self.buffers.start else 0


def plan_shuffle(
    n_rows: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    buffer_rows: int = 262144,
    chunk_rows: int | None = None,
    row_bytes: int,
    start: int = 0,
    skip_batches: int = 0,
) -> ShufflePlan:
    """The plan of one epoch over rows [start, start + n_rows) whose rows are `row_bytes` long per model.

    `chunk_rows` defaults to R/256 rows, at least 256 KiB per model and at most R/16 rows.
    """
    B = int(batch_size)
    if B <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if int(buffer_rows) < B:
        raise ConfigError(f"buffer_rows ({buffer_rows}) must be >= batch_size ({B}): raise buffer_rows or lower batch_size")
    if int(seed) < 0 or int(epoch) < 0:
        raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    skip = int(skip_batches)
    if skip < 0:
        raise ConfigError(f"skip_batches must be >= 0, got {skip_batches}")
    R = (int(buffer_rows) // B) * B
    if skip >= n_rows // B:
        empty = np.zeros(0, dtype=np.int64)
        return ShufflePlan(n_rows, start, B, R, 0, int(seed), int(epoch), skip, empty, empty, range(0))
    if chunk_rows is None:
        # >= 256 KiB per read (smaller preads cost more per byte), >= 16 chunks mixed per buffer
        C = max(1, min(max(R // 256, (256 << 10) // row_bytes), R // 16))
    else:
        C = int(chunk_rows)
    if C <= 0:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    n_chunks = -(-n_rows // C)
    order = np.random.default_rng([int(seed), int(epoch), 0]).permutation(n_chunks)
    lens = np.full(n_chunks, C, dtype=np.int64)
    lens[-1] = n_rows - C * (n_chunks - 1)
    stream = np.concatenate([[0], np.cumsum(lens[order])])
    chunk_starts = start + order.astype(np.int64) * C
    first, last = skip // (R // B), n_rows // R + (n_rows % R >= B)
    return ShufflePlan(n_rows, start, B, R, C, int(seed), int(epoch), skip, chunk_starts, stream, range(first, last))


def iter_shuffled(
    plan: ShufflePlan,
    read_planes: ReadPlanes,
    *,
    d_model: int,
    cache_dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: torch.device,
    prefetch: bool,
) -> Iterator[torch.Tensor]:
    """Batches [B, 2, d] in `out_dtype` on `device`, as `plan` orders them.

    Chunks are read straight into planes [2, R, d] (base, chat) in the cache dtype, with no staging
    copy. With `prefetch` the next buffer is read on a background thread while this one's batches are
    served: two buffers in memory instead of one.
    """
    B, first = plan.batch_size, plan.buffers.start

    def fill(k: int, raw: np.ndarray) -> int:
        """Read buffer k into planes `raw` [2, >= L, row_bytes]; return L."""
        for g, n, o in plan.reads(k):
            read_planes(g, g + n, raw[:, o : o + n])
        return plan.buffer_len(k)

    shape = (2, min(plan.buffer_rows, plan.n_rows), d_model)
    bufs = [torch.empty(shape, dtype=cache_dtype, pin_memory=device.type == "cuda") for _ in range(1 + prefetch)]
    raws = [b.view(torch.uint8).numpy() for b in bufs]
    rows = torch.empty((2, B, d_model), dtype=cache_dtype, device=device)  # gathered, before conversion
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crossdiff-cache-prefetch") if prefetch else None
    try:
        pending = pool.submit(fill, first, raws[0]) if pool else None
        for k in plan.buffers:
            slot = (k - first) % len(bufs)
            L = pending.result() if pool else fill(k, raws[slot])
            if pool and k + 1 < plan.buffers.stop:
                pending = pool.submit(fill, k + 1, raws[(k + 1 - first) % len(bufs)])
            perm = torch.from_numpy(plan.permutation(k)).to(device)
            # On an accelerator the buffer moves once (a blocking copy: its slot is refilled later)
            # and the batches are gathered there.
            data = bufs[slot][:, :L] if device.type == "cpu" else bufs[slot][:, :L].to(device)
            for b in range(plan.first_batch(k), L // B):
                idx = perm[b * B : (b + 1) * B]
                for m in range(2):
                    torch.index_select(data[m], 0, idx, out=rows[m])
                out = torch.empty((B, 2, d_model), dtype=out_dtype, device=device)
                out.copy_(rows.transpose(0, 1))
                yield out
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # the reader writes into our buffers
