"""Shuffled reading speed of the activation cache vs a naive per-row random-access DataLoader.

Writes a synthetic bf16 cache (d=256, default ~1.2 GB) in a temp dir, warms the page cache (sha256 of
every shard), then measures each reader in its own fresh process on ONE thread:
  - ActivationCache.shuffled_batches (bf16 cache -> float32 [B, 2, d] batches), one full epoch, for
    two buffer sizes, and once with `prefetch=True` (the next buffer is read on a second thread:
    its CPU rate counts both threads, its wall rate shows the overlap);
  - a torch DataLoader over a Dataset that reads one row per item from the same shard files
    (np.memmap per shard), shuffle=True, the same batch size, a fixed number of batches.
Prints tokens/s by wall clock and by the process's CPU time (the machine may be shared: CPU time is
what the one core spends), the ratio to the naive reader, and the peak RSS growth (ru_maxrss) of the
process during the read, next to the cache size.

    python bench/cache_reader.py [--tokens 1200000] [--d 256] [--batch 4096] [--naive-batches 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _write_cache(path: str, n_tokens: int, d: int, shard_rows: int) -> float:
    from crossdiff_core.cache import CacheWriter

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shard_rows, d, generator=g)  # the content does not matter for reading speed
    w = CacheWriter(path, d_model=d, layer=0, dtype="bfloat16", metadata={"models": {"base": "synthetic", "chat": "synthetic"}})
    n_shards = -(-n_tokens // shard_rows)
    t0 = time.perf_counter()
    for i in range(n_shards):
        n = min(shard_rows, n_tokens - i * shard_rows)
        base = noise[:n] + i
        chat = noise[:n] * 2 - i
        toks = {
            "sequence": np.arange(i * shard_rows, i * shard_rows + n) // 128,
            "position": np.arange(n) % 128 + 1,
            "token_id": np.arange(n) % 50000,
            "source": np.where(np.arange(n) % 2 == 0, "text", "chat"),
            "is_template": np.zeros(n, bool),
            "is_assistant": np.zeros(n, bool),
        }
        w.write_shard(i, base, chat, toks, background=True)
    w.finalize(n_shards)
    return time.perf_counter() - t0


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _PerRowDataset(torch.utils.data.Dataset):
    """The naive reader: one random row per __getitem__, from np.memmap views of the shard files."""

    def __init__(self, cache_dir: Path, manifest: dict) -> None:
        d = manifest["d_model"]
        self.maps = []
        for s in manifest["shards"]:
            f = cache_dir / s["file"]
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self.maps.append([np.memmap(f, dtype=np.uint16, mode="r", offset=8 + n + header[m]["data_offsets"][0], shape=(s["rows"], d))
                              for m in ("base", "chat")])
        self.offsets = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        r = i - int(self.offsets[s])
        row = np.stack([self.maps[s][0][r], self.maps[s][1][r]])  # [2, d] bf16 bits
        return torch.from_numpy(row.view(np.int16)).view(torch.bfloat16).float()


def _measure(cache_dir: str, reader: str, batch: int, buffer_rows: int, naive_batches: int, prefetch: bool) -> tuple[int, float, float, float]:
    """In a fresh process: (tokens, wall s, CPU s, peak RSS growth MiB) of one read."""
    torch.set_num_threads(1)
    from crossdiff_core.cache import ActivationCache

    cache = ActivationCache(cache_dir, verify="none")  # verified (and page-cache warmed) by the parent
    if reader == "shuffled":
        batches = cache.shuffled_batches(batch, seed=0, epoch=0, buffer_rows=buffer_rows, prefetch=prefetch)
    else:
        ds = _PerRowDataset(Path(cache_dir), cache.manifest)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
        batches = (b for i, b in zip(range(naive_batches), loader))
    rss0 = _maxrss_mib()
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        assert b.dtype == torch.float32 and b.shape == (batch, 2, cache.d_model)
        n += b.shape[0]
    return n, time.perf_counter() - t0, time.process_time() - c0, _maxrss_mib() - rss0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_200_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--naive-batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from crossdiff_core.cache import ActivationCache

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="crossdiff-bench-") as tmp, ctx.Pool(1, maxtasksperchild=1) as pool:
        write_s = pool.apply(_write_cache, (tmp, args.tokens, args.d, args.shard_rows))
        size_mib = sum(f.stat().st_size for f in Path(tmp, "shards").glob("*.safetensors")) / 2**20
        t0 = time.perf_counter()
        cache = ActivationCache(tmp, verify="full")  # hashes every shard: also warms the page cache
        verify_s = time.perf_counter() - t0
        row_mib = 2 * args.d * 2 / 2**20
        print(f"cache: {args.tokens:,} tokens, d={args.d}, bf16, {size_mib:.0f} MiB in {len(cache.manifest['shards'])} shards "
              f"(written in {write_s:.1f} s = {size_mib / write_s:.0f} MiB/s, sha256-verified in {verify_s:.2f} s); "
              f"batch {args.batch}, float32 out, 1 thread, each reader in a fresh process")
        configs = [(f"shuffled_batches, buffer {b:,} rows ({b * row_mib:.0f} MiB){' + prefetch thread' if p else ''}",
                    ("shuffled", args.batch, b, 0, p)) for b, p in ((65_536, False), (262_144, False), (262_144, True))]
        configs.append(("naive per-row DataLoader (np.memmap, shuffle=True)", ("naive", args.batch, 0, args.naive_batches, False)))
        best: dict[str, tuple] = {}
        for _ in range(args.repeats):  # interleaved repeats; keep each reader's fastest (the machine is shared)
            for name, cfg in configs:
                r = pool.apply(_measure, (tmp, *cfg))
                if name not in best or r[0] / r[1] > best[name][0] / best[name][1]:
                    best[name] = r
        n, wall, cpu, _ = best[configs[-1][0]]
        naive_wall, naive_cpu = n / wall, n / cpu
        print(f"best of {args.repeats} interleaved runs per reader")
        print(f"{'reader':<70} {'tokens':>10} {'tok/s wall':>12} {'vs naive':>9} {'tok/s CPU':>12} {'vs naive':>9} {'peak RSS growth':>16}")
        for name, _ in configs:
            n, wall, cpu, drss = best[name]
            print(f"{name:<70} {n:>10,} {n / wall:>12,.0f} {n / wall / naive_wall:>8.1f}x {n / cpu:>12,.0f} {n / cpu / naive_cpu:>8.1f}x {drss:>12.0f} MiB")

if __name__ == "__main__":
    main()
