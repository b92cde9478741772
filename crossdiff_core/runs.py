"""Each stage's products on disk and how the next stage opens them (DESIGN §2).

- the latents table ``latents.parquet`` of the analysis (:func:`write_latents`, :func:`read_latents`) and
  its summary JSON next to it (:func:`default_summary_path`, :func:`read_stage_json`);
- an activation cache's ``manifest.json`` (:func:`cache_manifest`) and the manifest of the cache a
  crosscoder was trained on (:func:`training_manifest`), which names the models and layer;
- the model pair a crosscoder belongs to (:func:`pair_for`).

A later stage opens an earlier stage's product only through this module, so a product's file name, its
checks and its error messages live in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .cache import MANIFEST
from .crosscoder import CrossCoder, CrossCoderConfig
from .errors import CacheError, ConfigError, CrossdiffError, ModelMismatchError
from .fileio import atomic_write
from .models import ModelPair, load_pair

LATENT_COLUMNS = ("latent", "norm_base", "norm_chat", "delta_norm", "cosine", "class", "freq", "max_act",
                  "template_share", "beta_error_base", "beta_error_chat", "beta_recon_base",
                  "beta_recon_chat", "nu_error", "nu_recon", "nu_rank")
# what the evaluations (KL gap, steering, cards) read from the table
EVAL_COLUMNS = ("latent", "class", "delta_norm", "max_act", "nu_rank")


# ---- the latents table and its summary ------------------------------------------------------------

def write_latents(table: pd.DataFrame, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``latents.parquet`` (DESIGN §2) atomically; ``metadata`` goes into the schema as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.int64() if c == "latent" else pa.string() if c == "class" else pa.float64())
                        for c in LATENT_COLUMNS])
    t = pa.Table.from_pandas(table[list(LATENT_COLUMNS)], schema=schema, preserve_index=False)
    if metadata:
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), b"crossdiff": json.dumps(metadata).encode()})
    atomic_write(path, lambda p: pq.write_table(t, p))
    return path


def read_latents(path: str | os.PathLike, model: CrossCoder | None = None,
                 columns: tuple[str, ...] = EVAL_COLUMNS) -> pd.DataFrame:
    """``latents.parquet``, checked: it has ``columns`` (what the evaluations read) and, when ``model`` is
    given, one row per latent of it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: write it with `crossdiff analyze` for this crosscoder")
    table = pd.read_parquet(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{path} lacks the columns {missing}: it is not a latents table of `crossdiff analyze`")
    if model is not None and len(table) != model.cfg.dict_size:
        raise ModelMismatchError(f"{path} describes {len(table)} latents, the crosscoder has {model.cfg.dict_size}: "
                                 "pass the latents.parquet that `crossdiff analyze` wrote for this crosscoder")
    return table


def default_summary_path(out: str | os.PathLike) -> Path:
    """``latents.parquet`` -> ``latents.summary.json`` next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def read_stage_json(path: str | os.PathLike) -> dict:
    """A stage's JSON product: an analysis summary (:func:`default_summary_path`), a KL-gap evaluation,
    latent cards, a steering sweep."""
    p = Path(path)
    if not p.is_file():
        raise CrossdiffError(f"{p} does not exist: run the stage that writes it, or leave the option out")
    return json.loads(p.read_text())


# ---- cache manifests --------------------------------------------------------------------------------

def cache_manifest(cache_dir: str | os.PathLike) -> tuple[dict, str]:
    """An activation cache's ``manifest.json`` and the sha256 (hex) of its bytes."""
    p = Path(cache_dir) / MANIFEST
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CacheError(f"{p} cannot be read ({exc.strerror or exc}): pass a finished activation cache "
                         "(`crossdiff cache` writes the manifest last)") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise CacheError(f"{p} is not JSON ({exc}): rebuild the cache with `crossdiff cache`") from exc
    return manifest, hashlib.sha256(raw).hexdigest()


def training_manifest(cc: CrossCoder | CrossCoderConfig) -> dict | None:
    """The manifest of the cache a crosscoder was trained on (it records ``models`` and ``layer``); None
    when the crosscoder records no cache or that cache's manifest is gone or unreadable."""
    cfg = cc.cfg if isinstance(cc, CrossCoder) else cc
    if not cfg.cache:
        return None
    try:
        return cache_manifest(cfg.cache)[0]
    except CacheError:
        return None


def pair_for(cc: CrossCoder, *, base: str | None = None, chat: str | None = None, layer: int | None = None,
             dtype: str = "float32", device: str = "cpu") -> ModelPair:
    """Load the model pair a crosscoder belongs to. Models and layer default to those recorded in the
    manifest of the cache the crosscoder was trained on (``models.base``, ``models.chat``, ``layer``)."""
    rec = training_manifest(cc) or {}
    models = rec.get("models") or {}
    base, chat = base or models.get("base"), chat or models.get("chat")
    layer = layer if layer is not None else rec.get("layer")
    if not base or not chat or layer is None:
        raise ConfigError("cannot tell which models and layer this crosscoder belongs to (its training cache "
                          f"{cc.cfg.cache!r} records none): pass --base, --chat and --layer")
    if rec.get("layer") is not None and layer != rec["layer"]:
        raise ModelMismatchError(f"the crosscoder was trained on layer {rec['layer']} but layer {layer} was asked "
                                 "for: drop --layer, or use a crosscoder trained on that layer")
    pair = load_pair(base, chat, layer=int(layer), dtype=dtype, device=device)
    if pair.d_model != cc.cfg.d_model:
        raise ModelMismatchError(f"the models have d_model={pair.d_model}, the crosscoder {cc.cfg.d_model}: "
                                 "pass the models the crosscoder was trained on")
    return pair
