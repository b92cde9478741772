"""The caching stage's units of work: one dataset slice (a round-robin share of the shard plan) into the
cache directory, and the merge that writes tokens.parquet and the one manifest. Slices can run on
different workers at once (they write disjoint shard files of a shared directory); re-running a slice
skips its complete shards."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE


def _load(pair: dict, data: dict, cache: dict):
    from crossdiff_core.data import DataConfig, build_corpus
    from crossdiff_core.models import load_pair

    mp = load_pair(pair["base"], pair["chat"], layer=int(cache["layer"]), dtype=cache.get("model_dtype", "bfloat16"),
                   device=cache.get("device", "cpu"), base_revision=pair.get("base_revision"),
                   chat_revision=pair.get("chat_revision"))
    return mp, build_corpus(mp.tokenizer, DataConfig.from_dict(data))


def _run(pair: dict, data: dict, cache: dict, out_dir: str, *, part: tuple[int, int] | None, progress: bool):
    """Slice ``part = (index, n_slices)`` without finalizing, or (``part=None``) only the merge."""
    from crossdiff_core.caching import DEFAULT_SHARD_TOKENS, cache_activations, plan_shards, shard_slice

    mp, corpus = _load(pair, data, cache)
    shard_tokens = int(cache.get("shard_tokens", DEFAULT_SHARD_TOKENS))
    shards: list[int] = []
    if part is not None:
        shards = shard_slice(len(plan_shards([s.n_cached for s in corpus.sequences], shard_tokens)), *part)
    return cache_activations(mp, corpus, out_dir, batch_size=int(cache.get("batch_size", 8)), shard_tokens=shard_tokens,
                             cache_dtype=cache.get("dtype", "bfloat16"), progress=progress, shards=shards,
                             finalize=part is None)


# a retry resumes: the shards finished before the failure are kept
@task(name="cache-slice", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def cache_slice(pair: dict, data: dict, cache: dict, out_dir: str, index: int, n_slices: int,
                progress: bool = True) -> dict:
    """Compute the shards of slice ``index`` of ``n_slices`` into ``out_dir`` (no manifest yet)."""
    run = _run(pair, data, cache, out_dir, part=(index, n_slices), progress=progress)
    return {"slice": index, "computed": run.computed, "skipped": run.skipped, "tokens_computed": run.tokens_computed,
            "seconds": run.seconds, "tokens_per_s": run.tokens_per_s}


@task(name="cache-merge", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def merge_cache(pair: dict, data: dict, cache: dict, out_dir: str) -> dict:
    """Check every shard of the plan is complete, then write tokens.parquet and manifest.json."""
    run = _run(pair, data, cache, out_dir, part=None, progress=False)
    m = run.manifest
    return {"n_tokens": m["n_tokens"], "shards": len(m["shards"]), "d_model": m["d_model"], "layer": m["layer"]}
