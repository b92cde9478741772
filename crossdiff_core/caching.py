"""The caching driver: a model pair and a corpus -> an activation cache (DESIGN §2).

The shard plan is a pure function of the corpus's token counts and `shard_tokens`, computed before any
model runs, so a re-run finds the shards that are already complete (`CacheWriter.is_complete`) and
skips them without computing them again. Within a shard, sequences are sorted by length and batched
with right padding; both models run only up to block `layer`; BOS and padding are dropped; the rows
are stored in corpus order (by sequence, then position), so the result does not depend on batching.
Shards are written on the writer's background thread while the next shard is computed.

Several layers at once (`layers=[15, 24]`): one forward pass per model and batch, up to the deepest,
captures every listed block's output; one writer per layer writes a complete cache into
`out_dir/layer-L/` (`layer_dirs`), each equal to a single-layer run's. One layer: `out_dir` is the cache.
The layer may also be chosen by `crossdiff locate` (`cache.layer: auto`, `resolve_layer`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from crossdiff_core.cache import CacheWriter
from crossdiff_core.cache.lock import WriterLock
from crossdiff_core.cache.settings import clear_cache_files
from crossdiff_core.config import from_dict, neutral
from crossdiff_core.data import Corpus, DataConfig, TokenSequence, build_corpus, corpus_hash
from crossdiff_core.errors import ConfigError
from crossdiff_core.models import ModelPair, block_outputs, load_pair, torch_dtype

DEFAULT_SHARD_TOKENS = 65536
AUTO = "auto"  # cache.layer: the block `crossdiff locate` recommends


@dataclass
class CacheConfig:
    """How the activation cache is made (params.yaml ``cache``; the data is :class:`DataConfig`).
    :func:`~crossdiff_core.config.neutral` fields leave the cached activations unchanged."""

    # block whose residual output is cached (0-based), or "auto": the locate stage's recommended_layer
    layer: int | str = 2
    model_dtype: str = "float32"  # the models' dtype: float32 or bfloat16
    dtype: str = "bfloat16"  # stored activations: bfloat16 or float32
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard: the unit of resumption and of slicing
    batch_size: int = neutral(32)  # sequences per forward pass
    device: str = neutral("cpu")  # torch device: cpu, cuda, cuda:N or auto
    progress: bool = neutral(True)  # progress bar
    slices: int = neutral(1)  # the pipeline: round-robin slices of the shard plan, one flow run each
    deployment: str | None = neutral(None)  # the pipeline: Prefect deployment running the slices (None: here)
    overwrite: bool = neutral(False)  # replace a cache written with other settings (its files are deleted first)

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.shard_tokens <= 0 or self.slices <= 0:
            raise ConfigError(f"cache batch_size, shard_tokens and slices must be positive: {self}")
        if self.layer != AUTO and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"cache.layer must be a block index (an int >= 0) or {AUTO!r} (the locate stage's "
                              f"recommended_layer), got {self.layer!r}; several layers are `crossdiff cache "
                              "--layer A --layer B`")

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "cache") -> "CacheConfig":
        """From params.yaml's ``cache`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds the cached tokens of sequences `[start, stop)` of the corpus: `rows` of them."""

    index: int
    start: int
    stop: int
    rows: int


@dataclass
class CacheRun:
    """What a caching run did. `tokens_per_s` counts the tokens computed in this run (skipped shards excluded).
    `manifests`: each layer's manifest (one entry for a single layer); `manifest`: the first layer's."""

    manifest: dict[str, Any]
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    tokens_computed: int = 0
    seconds: float = 0.0
    manifests: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_computed / self.seconds if self.seconds > 0 else 0.0


def resolve_layer(layer: int | str, locate: str | os.PathLike | None) -> int:
    """The block to cache: ``layer`` itself, or for ``"auto"`` the ``recommended_layer`` of the ``crossdiff
    locate`` JSON ``locate`` (the locate stage's output; an int ``layer`` never reads it)."""
    if layer != AUTO:
        return int(layer)
    if locate is None:
        raise ConfigError("cache.layer is auto but no locate result is given: run the locate stage first "
                          "(dvc repro locate), or set cache.layer to a block index")
    p = Path(locate)
    try:
        rec = json.loads(p.read_text()).get("recommended_layer") if p.is_file() else None
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"cache.layer is auto, but {p} is no `crossdiff locate` JSON ({exc}): re-run the "
                          "locate stage, or set cache.layer to a block index") from exc
    if isinstance(rec, bool) or not isinstance(rec, int) or rec < 0:
        what = "holds no integer recommended_layer" if p.is_file() else "is missing"
        raise ConfigError(f"cache.layer is auto, but {p} {what}: "
                          "run the locate stage first (dvc repro locate), or set cache.layer to a block index")
    return rec


def check_layers(layers: Sequence[int]) -> list[int]:
    """``layers`` as a list of distinct block indices (>= 0), in the order given."""
    out = list(layers)
    bad = [L for L in out if isinstance(L, bool) or not isinstance(L, int) or L < 0]
    if not out or bad:
        raise ConfigError(f"layers must be one or more block indices (ints >= 0), got {list(layers)!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"layers {out} name a block twice: give each --layer once")
    return out


def layer_dirs(out_dir: str | os.PathLike, layers: Sequence[int]) -> dict[int, Path]:
    """Where each layer's cache goes: ``out_dir`` itself for one layer, ``out_dir/layer-L/`` for several."""
    layers = check_layers(layers)
    if len(layers) == 1:
        return {layers[0]: Path(out_dir)}
    return {L: Path(out_dir) / f"layer-{L}" for L in layers}


def clear_cache(out_dir: str | os.PathLike) -> list[str]:
    """Delete the cache files in ``out_dir`` under its writer lock (what ``overwrite`` does before a whole
    run; for a sliced run, once before the slices start). Returns what was deleted."""
    path = Path(out_dir)
    if not path.is_dir():
        return []
    lock = WriterLock(path, role="cache overwrite")
    lock.acquire()
    try:
        return clear_cache_files(path)
    finally:
        lock.release()


def plan_shards(n_cached: Sequence[int], shard_tokens: int) -> list[ShardPlan]:
    """Cut sequences (with `n_cached` cached tokens each) into contiguous shards of >= `shard_tokens` rows.

    A sequence never straddles two shards; only the last shard may be smaller.
    """
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
    plans: list[ShardPlan] = []
    start, rows = 0, 0
    for i, n in enumerate(n_cached):
        rows += int(n)
        if rows >= shard_tokens:
            plans.append(ShardPlan(len(plans), start, i + 1, rows))
            start, rows = i + 1, 0
    if rows:
        plans.append(ShardPlan(len(plans), start, len(n_cached), rows))
    return plans


def shard_slice(n_shards: int, index: int, n_slices: int) -> list[int]:
    """Shard indices of slice `index` of `n_slices` (round-robin, so slices get equal work)."""
    if not 0 <= index < n_slices:
        raise ConfigError(f"slice {index} is not in 0..{n_slices - 1}: use 0 <= slice < slices")
    return list(range(index, n_shards, n_slices))


def code_version() -> dict[str, str]:
    """Package version, and the git commit when the package runs from a git checkout."""
    out = {"crossdiff": importlib.metadata.version("crossdiff")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        out["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _shard_tokens_table(seqs: list[TokenSequence], first_sequence: int) -> dict[str, np.ndarray]:
    """Token columns for a shard, rows in (sequence, position) order."""
    counts = np.array([s.n_cached for s in seqs], dtype=np.int64)
    return {
        "sequence": np.repeat(np.arange(first_sequence, first_sequence + len(seqs), dtype=np.int64), counts),
        "position": np.concatenate([np.flatnonzero(s.cached) for s in seqs]).astype(np.int32),
        "token_id": np.concatenate([s.token_ids[s.cached] for s in seqs]).astype(np.int32),
        "source": np.repeat(np.array([s.source for s in seqs], dtype=object), counts),
        "is_template": np.concatenate([s.is_template[s.cached] for s in seqs]),
        "is_assistant": np.concatenate([s.is_assistant[s.cached] for s in seqs]),
    }


@dataclass(frozen=True)
class Batch:
    """One padded forward pass: `input_ids`, `attention_mask` `[B, T]` (right padding); `keep` `[B, T]`
    marks the cached tokens (not BOS, not padding) and `rows` `[n_keep]` their rows in the shard."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor
    rows: torch.Tensor


def shard_batches(seqs: list[TokenSequence], *, batch_size: int, pad_id: int) -> list[Batch]:
    """Batches of `seqs`, longest first (little padding), with each cached token's row in the shard.

    Shard rows are in (sequence, position) order, so the stored result does not depend on batching.
    """
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    counts = np.array([s.n_cached for s in seqs], dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])  # row of each sequence's first cached token
    order = np.argsort(-lengths, kind="stable")
    out = []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = int(lengths[idx].max())
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        keep = np.zeros((len(idx), width), dtype=bool)
        for j, i in enumerate(idx):  # one copy per sequence, not per token
            ids[j, :lengths[i]] = seqs[i].token_ids
            keep[j, :lengths[i]] = seqs[i].cached
        attn = (np.arange(width)[None, :] < lengths[idx][:, None]).astype(np.int64)
        rows = (first_row[idx][:, None] + np.cumsum(keep, axis=1) - 1)[keep]
        out.append(Batch(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(keep), torch.from_numpy(rows)))
    return out


@torch.inference_mode()
def compute_shard(pair: ModelPair, seqs: list[TokenSequence], *, batch_size: int, out_dtype: torch.dtype,
                  pad_id: int, on_batch: Callable[[int], None] | None = None, layers: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Block-`pair.layer` activations of the cached tokens of `seqs`: base and chat, each `[rows, d]`;
    with `layers`, `{layer: (base, chat)}` for each of them, from one forward pass per model and batch.

    Rows are in (sequence, position) order, on CPU, in `out_dtype`. Right padding: under causal attention
    a real token never attends to the pads after it (the attention mask keeps that true for any
    attention implementation), so padding does not change the cached values.
    """
    wanted = check_layers([pair.layer] if layers is None else layers)
    rows = sum(s.n_cached for s in seqs)
    out = {L: tuple(torch.empty((rows, pair.d_model), dtype=out_dtype) for _ in range(2)) for L in wanted}
    for batch in shard_batches(seqs, batch_size=batch_size, pad_id=pad_id):
        ids, mask = batch.input_ids.to(pair.device), batch.attention_mask.to(pair.device)
        hs = [block_outputs(m, ids, mask, layers=wanted) for m in (pair.base, pair.chat)]  # [B, T, d] per layer
        keep = batch.keep.to(pair.device)
        for i, L in enumerate(wanted):
            for m in range(2):
                out[L][m].index_copy_(0, batch.rows, hs[m][i][keep].to(out_dtype).cpu())
        if on_batch is not None:
            on_batch(len(batch.rows))
    return out[pair.layer] if layers is None else out


def cache_activations(pair: ModelPair, corpus: Corpus, out_dir: str | os.PathLike, *,
                      batch_size: int = CacheConfig.batch_size, shard_tokens: int = CacheConfig.shard_tokens,
                      cache_dtype: str = CacheConfig.dtype,
                      progress: bool = True, on_shard: Callable[[int], None] | None = None,
                      metadata: dict[str, Any] | None = None, shards: Sequence[int] | None = None,
                      finalize: bool = True, overwrite: bool = CacheConfig.overwrite,
                      layers: Sequence[int] | None = None) -> CacheRun:
    """Cache block-`pair.layer` activations of both models on every cached token of `corpus` into `out_dir`;
    with `layers`, each of those blocks into its own cache (`layer_dirs`: `out_dir/layer-L/` for several)
    from one forward pass per batch.

    Resumable: complete shards of an earlier run with the same models, data and settings are kept (per
    layer: a shard is computed for the layers that lack it).
    `on_shard(i)` is called after shard `i` is handed to the writer (tests use it to interrupt a run).
    `shards`: compute only these shard indices (one slice of a cache split across workers writing into
    the same directory); `finalize=False` leaves tokens.parquet and the manifest to a later run (then
    `manifest` is empty). A run with `shards=[]` and `finalize=True` merges the slices.
    One writer per cache: a slice (`shards` without `finalize`) runs alongside other slices, anything else
    alone (`CacheWriter`). A directory holding a cache made with other settings is refused, naming them,
    unless `overwrite` (whole runs only), which deletes its cache files first.
    """
    import contextlib

    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if not corpus.sequences:
        raise ConfigError("the corpus is empty: give data sources with some text or chats")
    dirs = layer_dirs(out_dir, [pair.layer] if layers is None else layers)
    plans = plan_shards([s.n_cached for s in corpus.sequences], shard_tokens)
    meta = {**pair.metadata(), **corpus.metadata(), "code_version": code_version(),
            "cache": {"shard_tokens": shard_tokens}, **(metadata or {})}
    meta["data"]["corpus_sha256"] = corpus_hash(corpus)
    tok = pair.tokenizer
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
    out_dtype = torch_dtype(cache_dtype)
    run = CacheRun(manifest={})
    n_plans = len(plans)
    if shards is not None:
        wanted = {int(i) for i in shards}
        if not wanted <= set(range(n_plans)):
            raise ConfigError(f"shard indices {sorted(wanted - set(range(n_plans)))} are outside the plan's "
                              f"{n_plans} shards: slice with `shard_slice(n_shards, i, n)`")
        if overwrite:
            raise ConfigError("overwrite applies to a whole caching run, not to a slice or a merge: overwrite "
                              "with one whole run, or empty the directory before the slices start")
        plans = [p for p in plans if p.index in wanted]
    writer_shards = None if shards is None or finalize else sorted(wanted)  # a slice shares the directory
    with contextlib.ExitStack() as stack:
        writers = {L: stack.enter_context(CacheWriter(d, d_model=pair.d_model, layer=L, dtype=cache_dtype,
                                                      metadata=meta, shards=writer_shards, overwrite=overwrite))
                   for L, d in dirs.items()}
        todo = [[L for L, w in writers.items() if not w.is_complete(p.index)] for p in plans]  # layers lacking it
        total = sum(p.rows for p in plans)
        skipped_rows = sum(p.rows for p, t in zip(plans, todo) if not t)
        bar = stack.enter_context(tqdm(total=total, initial=skipped_rows, unit="tok", unit_scale=True, desc="caching",
                                       disable=not progress, smoothing=0.1))
        t0 = time.perf_counter()
        for plan, need in zip(plans, todo):
            if not need:
                run.skipped.append(plan.index)
                continue
            seqs = corpus.sequences[plan.start:plan.stop]
            acts = compute_shard(pair, seqs, batch_size=batch_size, out_dtype=out_dtype, pad_id=pad_id,
                                 on_batch=bar.update, layers=need)
            table = _shard_tokens_table(seqs, plan.start)
            for L in need:
                writers[L].write_shard(plan.index, *acts[L], table, background=True)
            run.computed.append(plan.index)
            run.tokens_computed += plan.rows
            if on_shard is not None:
                on_shard(plan.index)
        if finalize:
            run.manifests = {L: w.finalize(n_plans) for L, w in writers.items()}
            run.manifest = next(iter(run.manifests.values()))
        run.seconds = time.perf_counter() - t0
    return run


def run_cache(base: str, chat: str, out_dir: str | os.PathLike, data: DataConfig, *, layer: int | Sequence[int],
              dtype: str = CacheConfig.model_dtype, device: str = CacheConfig.device,
              batch_size: int = CacheConfig.batch_size, shard_tokens: int = CacheConfig.shard_tokens,
              cache_dtype: str = CacheConfig.dtype, progress: bool = True, base_revision: str | None = None, chat_revision: str | None = None,
              part: Literal["all", "merge"] | tuple[int, int] = "all", overwrite: bool = CacheConfig.overwrite) -> CacheRun:
    """Load and check the pair, build the corpus, cache: what `crossdiff cache` and the cache tasks run.

    `part` is how much of the cache this run makes: "all" every shard, then tokens.parquet and the
    manifest; `(index, n_slices)` only that round-robin slice of the shard plan (`shard_slice`), with no
    manifest, so slices can run at once on workers sharing `out_dir`; "merge" no shard, only tokens.parquet
    and the manifest once every slice is done (else a CacheError names the missing shards). The pair is
    loaded for a merge too: its metadata fingerprints the shards that may be merged.
    `overwrite` (with part="all" only): replace a cache written with other settings (`cache_activations`).
    `layer`: one block, or a list of blocks: one cache per block (`layer_dirs`) from one forward pass.
    """
    layers = check_layers([layer] if isinstance(layer, (int, str)) else layer)
    _check_part(part)
    if overwrite and part != "all":
        raise ConfigError(f"overwrite applies to a whole caching run (part='all'), not part={part!r}: overwrite "
                          "with one whole run, or empty the directory before the slices start")
    # the deepest block is the one that may not exist (all are >= 0)
    pair = load_pair(base, chat, layer=max(layers), dtype=dtype, device=device, base_revision=base_revision,
                     chat_revision=chat_revision)
    corpus = build_corpus(pair.tokenizer, data)
    shards: list[int] | None = None
    if part == "merge":
        shards = []
    elif part != "all":
        shards = shard_slice(len(plan_shards([s.n_cached for s in corpus.sequences], shard_tokens)), *part)
    return cache_activations(pair, corpus, out_dir, batch_size=batch_size, shard_tokens=shard_tokens,
                             cache_dtype=cache_dtype, progress=progress, shards=shards,
                             finalize=part in ("all", "merge"), overwrite=overwrite,
                             layers=None if isinstance(layer, int) else layers)


def _check_part(part: object) -> None:
    """Fail before any model loads on a `part` that `run_cache` cannot run."""
    if isinstance(part, str) and part in ("all", "merge"):
        return
    if (isinstance(part, tuple) and len(part) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in part)):
        shard_slice(0, *part)  # checks 0 <= index < n_slices
        return
    raise ConfigError(f"part must be 'all', 'merge' or (index, n_slices), got {part!r}: pass one of those")
