"""What `crossdiff cache-info` prints about an activation cache (DESIGN §2)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow.compute as pc

from crossdiff_core.cache.format import MODELS, REQUIRED_KEYS, TOKENS
from crossdiff_core.cache.reader import ActivationCache
from crossdiff_core.normalisation import norm_growth

__all__ = ["cache_summary"]


def cache_summary(path: str | os.PathLike, *, verify: bool = True, check_values: bool = True) -> dict[str, Any]:
    """What `crossdiff cache-info` prints: shape, size, scales, token counts, and whether checksums match.

    `verify`: hash every shard against the manifest. `check_values`: read every value and refuse NaN/inf
    (`ActivationCache.check_finite`). Either failure is a CacheError naming the shards.
    """
    cache = ActivationCache(path, verify="full" if verify else "none")
    if check_values:
        cache.check_finite()
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
        "values": "all finite" if check_values else "not checked",
        "scales": dict(zip(MODELS, cache.scales().tolist())),
        "mean_norm": {k: float(np.linalg.norm(m["stats"][k]["mean"])) for k in MODELS},
        # which dimensions carry each model's mean squared norm and the chat/base difference (massive activations)
        "norm_growth": norm_growth(m["stats"]),
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
