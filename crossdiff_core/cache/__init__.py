"""Activation cache (DESIGN §2): paired base/chat activations of one layer, sharded safetensors files.

One module per idea: `format` (what is on disk: names, dtypes, schemas, checksums, statistics),
`writer` (`CacheWriter`), `reader` (`ActivationCache`), `shuffle` (the shuffle plan, a pure function,
and the buffered iterator that `ActivationCache.shuffled_batches` runs), `summary` (`cache_summary`),
`lock` (one writer per cache: `WriterLock`) and `settings` (which settings wrote a cache directory; the
refusal of a re-run with other settings, and clearing for an overwrite).
"""

from crossdiff_core.cache.format import (FORMAT_VERSION, MANIFEST, MODELS, REQUIRED_KEYS, SHARDS_DIR, TOKEN_SCHEMA, TOKENS, read_manifest,
                                         shard_name)
from crossdiff_core.cache.reader import ActivationCache
from crossdiff_core.cache.shuffle import ShufflePlan, plan_shuffle
from crossdiff_core.cache.summary import cache_summary
from crossdiff_core.cache.writer import CacheWriter

__all__ = [
    "ActivationCache",
    "CacheWriter",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODELS",
    "REQUIRED_KEYS",
    "SHARDS_DIR",
    "ShufflePlan",
    "TOKENS",
    "TOKEN_SCHEMA",
    "cache_summary",
    "plan_shuffle",
    "read_manifest",
    "shard_name",
]
