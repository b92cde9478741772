"""The caching stage's units of work: one dataset slice (a round-robin share of the shard plan) into the
cache directory, and the merge that writes tokens.parquet and the one manifest. Slices can run on
different workers at once (they write disjoint shard files of a shared directory); re-running a slice
skips its complete shards. ``cache.overwrite``: the cache files are deleted once before the slices start
(:func:`overwrite_cache`; a slice writer cannot overwrite). ``cache.layer`` reaches these tasks as a block
index (the flow resolves ``auto``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE


def _run(pair: dict, data: dict, cache: dict, out_dir: str, *, part: tuple[int, int] | None, progress: bool):
    """Slice ``part = (index, n_slices)`` without finalizing, or (``part=None``) only the merge."""
    from crossdiff_core.caching import CacheConfig, run_cache
    from crossdiff_core.data import DataConfig

    c = CacheConfig.from_dict(cache)
    return run_cache(pair["base"], pair["chat"], out_dir, DataConfig.from_dict(data), layer=c.layer,
                     dtype=c.model_dtype, device=c.device, base_revision=pair.get("base_revision"),
                     chat_revision=pair.get("chat_revision"), batch_size=c.batch_size, shard_tokens=c.shard_tokens,
                     cache_dtype=c.dtype, progress=progress and c.progress, part="merge" if part is None else part)


# a retry resumes: the shards finished before the failure are kept
@task(name="cache-slice", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def cache_slice(pair: dict, data: dict, cache: dict, out_dir: str, index: int, n_slices: int,
                progress: bool = True) -> dict:
    """Compute the shards of slice ``index`` of ``n_slices`` into ``out_dir`` (no manifest yet)."""
    run = _run(pair, data, cache, out_dir, part=(index, n_slices), progress=progress)
    return {"slice": index, "computed": run.computed, "skipped": run.skipped, "tokens_computed": run.tokens_computed,
            "seconds": run.seconds, "tokens_per_s": run.tokens_per_s}


@task(name="cache-overwrite", cache_policy=NONE)
def overwrite_cache(cache: dict, out_dir: str) -> list[str]:
    """With ``cache.overwrite``, delete the cache files in ``out_dir`` (every run while it is set: a killed
    run then starts afresh); without it nothing. Returns what was deleted."""
    from crossdiff_core.caching import CacheConfig, clear_cache

    return clear_cache(out_dir) if CacheConfig.from_dict(cache).overwrite else []


@task(name="cache-merge", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def merge_cache(pair: dict, data: dict, cache: dict, out_dir: str) -> dict:
    """Check every shard of the plan is complete, then write tokens.parquet and manifest.json."""
    run = _run(pair, data, cache, out_dir, part=None, progress=False)
    m = run.manifest
    return {"n_tokens": m["n_tokens"], "shards": len(m["shards"]), "d_model": m["d_model"], "layer": m["layer"]}
