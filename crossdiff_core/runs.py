"""Each stage's products on disk and how the next stage opens them (DESIGN §2).

- the latents table ``latents.parquet`` of the analysis (:func:`write_latents`, :func:`read_latents`) and
  its summary JSON next to it (:func:`default_summary_path`, :func:`read_stage_json`);
- an activation cache's ``manifest.json`` (:func:`cache_manifest`) and the manifest of the cache a
  crosscoder was trained on (:func:`training_manifest`), which names the models and layer;
- the model pair a crosscoder belongs to (:func:`pair_for`).

A later stage opens an earlier stage's product only through this module, so a product's file name, its
checks and its error messages live in one place. Identity is by content, not by path: a cache manifest
records each model's content fingerprint (:func:`~crossdiff_core.models.model_fingerprint`), a crosscoder
records its training cache's manifest sha256, and the products of a crosscoder (latents.parquet's
metadata, the ``inputs`` of kl.json, steering.json, cards.json) record its weights sha256 (of
model.safetensors). :func:`check_models`, :func:`read_latents` and :func:`check_same_crosscoder` refuse a
mismatch with a :class:`ModelMismatchError` naming both sides, unless the stage's ``allow_mismatch``
(``--allow-mismatch``) asks for the cross-use deliberately.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .cache import MANIFEST, read_manifest
from .crosscoder import CrossCoder, CrossCoderConfig
from .decoder_norms import CLASSES
from .errors import CacheError, ConfigError, CrossdiffError, ModelMismatchError
from .fileio import atomic_write
from .models import ModelPair, fingerprint_differences, load_pair

LATENT_COLUMNS = ("latent", "norm_base", "norm_chat", "delta_norm", "cosine", "class", "freq", "max_act",
                  "template_share", "beta_error_base", "beta_error_chat", "beta_recon_base",
                  "beta_recon_chat", "nu_error", "nu_recon", "nu_rank")
# the column types of DESIGN §2 (what write_latents writes; a reader accepts any integer / numeric type)
LATENT_TYPES = {c: "integer" if c == "latent" else "string" if c == "class" else "number" for c in LATENT_COLUMNS}
_TYPE_CHECKS = {"integer": pa.types.is_integer, "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
                or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)),
                "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)}
CROSSCODER_SHA = "weights_sha256"  # key of the crosscoder's sha256 (of model.safetensors) in the products' records
ALLOW_MISMATCH = "--allow-mismatch"  # the flag of evaluate, steer, cards and report for deliberate cross-use


def short(sha: str | None) -> str:
    """The first 12 hex digits of a hash, for messages."""
    return f"{sha[:12]}..." if sha else "none recorded"


# ---- the latents table and its summary ------------------------------------------------------------

def write_latents(table: pd.DataFrame, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``latents.parquet`` (DESIGN §2) atomically; ``metadata`` goes into the schema as JSON (the
    analysis records the crosscoder's ``weights_sha256`` there, which :func:`read_latents` checks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.int64() if c == "latent" else pa.string() if c == "class" else pa.float64())
                        for c in LATENT_COLUMNS])
    t = pa.Table.from_pandas(table[list(LATENT_COLUMNS)], schema=schema, preserve_index=False)
    if metadata:
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), b"crossdiff": json.dumps(metadata).encode()})
    atomic_write(path, lambda p: pq.write_table(t, p))
    return path


def _parquet_schema(path: Path, what: str) -> pa.Schema:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: write it with `crossdiff analyze` for this crosscoder"
                          if what == "latents" else f"{path} does not exist: run the stage that writes it")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable parquet file ({exc}): it is truncated or corrupt; "
                          "re-run the stage that writes it") from None


def latents_metadata(path: str | os.PathLike) -> dict:
    """What the analysis recorded in ``latents.parquet``'s schema (``crosscoder``, ``cache``, ...); {} when
    another tool wrote the table without it."""
    meta = _parquet_schema(Path(path), "latents").metadata or {}
    try:
        d = json.loads(meta.get(b"crossdiff", b"{}"))
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def recorded_crosscoder(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(crosscoder path, weights sha256) that ``latents.parquet`` at ``path`` records (None where not)."""
    cc = latents_metadata(path).get("crosscoder") or {}
    return (cc.get("path"), cc.get(CROSSCODER_SHA)) if isinstance(cc, dict) else (None, None)


def check_same_crosscoder(what: str, recorded: tuple[str | None, str | None], found: tuple[str | None, str | None],
                          *, allow_mismatch: bool = False, flag: str = ALLOW_MISMATCH) -> None:
    """Refuse (:class:`ModelMismatchError` naming both sides) when ``what`` records a crosscoder whose
    weights hash differs from the one it is used with; ``recorded``/``found``: (path, sha256). Nothing to
    compare (a hash not recorded) passes."""
    (rp, rs), (fp, fs) = recorded, found
    if not rs or not fs or rs == fs or allow_mismatch:
        return
    raise ModelMismatchError(f"{what} was written for the crosscoder {rp or '?'} (weights sha256 {short(rs)}), but it "
                             f"is used with the crosscoder {fp or '?'} (weights sha256 {short(fs)}): the numbers would "
                             f"describe another crosscoder. Use the products of one crosscoder, or pass {flag} to "
                             "combine them deliberately")


def read_latents(path: str | os.PathLike, model: CrossCoder | None = None, *, allow_mismatch: bool = False) -> pd.DataFrame:
    """``latents.parquet``, checked: every DESIGN §2 column with its type, class labels from
    :data:`~crossdiff_core.decoder_norms.CLASSES`, and, when ``model`` is given, one row per latent of it
    and (unless ``allow_mismatch``) written for it: the weights sha256 its metadata records is the model's."""
    path = Path(path)
    schema = _parquet_schema(path, "latents")
    missing = [c for c in LATENT_COLUMNS if c not in schema.names]
    if missing:
        raise ConfigError(f"{path} lacks the columns {missing}: it is not a latents table of `crossdiff analyze` "
                          "(DESIGN §2); re-run the analysis")
    wrong = [f"{c} is {schema.field(c).type}, not {LATENT_TYPES[c]}" for c in LATENT_COLUMNS
             if not _TYPE_CHECKS[LATENT_TYPES[c]](schema.field(c).type)]
    if wrong:
        raise ConfigError(f"{path}: columns of the wrong type ({'; '.join(wrong)}): it is not a latents table of "
                          "`crossdiff analyze` (DESIGN §2); re-run the analysis")
    try:
        table = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): it is truncated or corrupt; re-run the analysis") from None
    table["class"] = table["class"].astype(object)
    labels = set(table["class"].dropna().unique()) - set(CLASSES)
    if labels or table["class"].isna().any():
        raise ConfigError(f"{path}: class labels {sorted(map(str, labels)) or ['null']} are none of {list(CLASSES)}: "
                          "it is not a latents table of this crossdiff version; re-run the analysis")
    if model is not None:
        if len(table) != model.cfg.dict_size:
            raise ModelMismatchError(f"{path} describes {len(table)} latents, the crosscoder has {model.cfg.dict_size}: "
                                     "pass the latents.parquet that `crossdiff analyze` wrote for this crosscoder")
        if not np.array_equal(np.sort(table["latent"].to_numpy()), np.arange(model.cfg.dict_size)):
            raise ConfigError(f"{path}: the latent column is not 0..{model.cfg.dict_size - 1}, once each; "
                              "re-run the analysis")
        check_same_crosscoder(str(path), recorded_crosscoder(path),
                              (getattr(model, "source", None), getattr(model, CROSSCODER_SHA, None)),
                              allow_mismatch=allow_mismatch)
    return table


def default_summary_path(out: str | os.PathLike) -> Path:
    """``latents.parquet`` -> ``latents.summary.json`` next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def read_stage_json(path: str | os.PathLike, *, required: tuple[str, ...] = ()) -> dict:
    """A stage's JSON product (an analysis summary, a KL-gap evaluation, latent cards, a steering sweep):
    a JSON object holding the keys ``required``; anything else is a :class:`CrossdiffError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CrossdiffError(f"{p} does not exist: run the stage that writes it, or leave the option out")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CrossdiffError(f"{p} is not readable JSON ({exc}): it is truncated or corrupt; re-run the stage "
                             "that writes it") from None
    if not isinstance(d, dict):
        raise CrossdiffError(f"{p} holds a JSON {type(d).__name__}, not the object its stage writes: pass the "
                             "stage's own output file")
    missing = [k for k in required if k not in d]
    if missing:
        raise CrossdiffError(f"{p} lacks the keys {missing}: it is not the output of the stage it was passed as; "
                             "pass that stage's own output file")
    return d


def read_tracking(path: str | os.PathLike) -> pd.DataFrame:
    """The behaviour-tracking table of ``crossdiff steer`` (one row per latent), checked to parse and to
    have its ``latent`` column."""
    p = Path(path)
    if not p.is_file():
        raise CrossdiffError(f"{p} does not exist: run `crossdiff steer` with a ground truth, or leave --tracking out")
    try:
        t = pd.read_parquet(p)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CrossdiffError(f"{p} is not a readable parquet file ({exc}): re-run `crossdiff steer`") from None
    if "latent" not in t.columns:
        raise CrossdiffError(f"{p} has no `latent` column: it is not a behaviour-tracking table of `crossdiff steer`")
    return t


# ---- cache manifests --------------------------------------------------------------------------------

def cache_manifest(cache_dir: str | os.PathLike) -> tuple[dict, str]:
    """An activation cache's ``manifest.json`` and the sha256 (hex) of its bytes, read through
    :func:`crossdiff_core.cache.read_manifest` (a regular file inside the cache: a FIFO never blocks it)."""
    manifest, raw = read_manifest(Path(cache_dir))
    if not isinstance(manifest, dict):
        raise CacheError(f"{Path(cache_dir) / MANIFEST} must hold a JSON object: rebuild the cache with `crossdiff cache`")
    return manifest, hashlib.sha256(raw).hexdigest()


def _training(cfg: CrossCoderConfig) -> tuple[dict | None, str]:
    """The manifest of the cache ``cfg`` was trained on, or None and why not. A manifest whose hash is not
    the recorded one is not the training cache any more (rebuilt or replaced at the same path): None."""
    if not cfg.cache:
        return None, "the crosscoder records no training cache"
    try:
        manifest, sha = cache_manifest(cfg.cache)
    except CacheError:
        return None, f"its training cache {cfg.cache} is gone or unreadable"
    if cfg.cache_manifest_hash and sha != cfg.cache_manifest_hash:
        return None, (f"its training cache {cfg.cache} was rebuilt since (manifest sha256 {short(sha)}, the crosscoder "
                      f"records {short(cfg.cache_manifest_hash)})")
    return manifest, "ok"


def training_manifest(cc: CrossCoder | CrossCoderConfig) -> dict | None:
    """The manifest of the cache a crosscoder was trained on (it records ``models`` and ``layer``); None
    when the crosscoder records no cache or that cache's manifest is gone, unreadable or rebuilt since."""
    return _training(cc.cfg if isinstance(cc, CrossCoder) else cc)[0]


def _refuse_rebuilt(why: str, allow_mismatch: bool) -> None:
    if "rebuilt" in why and not allow_mismatch:
        raise ModelMismatchError(f"cannot check the models: {why}, so the models it names may not be the ones "
                                 f"the crosscoder was trained on. Pass {ALLOW_MISMATCH} with --base, --chat and "
                                 "--layer to use these models deliberately")


def check_models(pair: ModelPair, cc: CrossCoder, *, allow_mismatch: bool = False) -> str:
    """Compare the loaded models' content fingerprints (:func:`~crossdiff_core.models.model_fingerprint`)
    with those the crosscoder's training cache recorded. Returns ``"same models"``, ``"allowed"`` or
    ``"unchecked: <why>"`` (nothing recorded to compare with); a difference is a
    :class:`ModelMismatchError` naming both sides."""
    rec, why = _training(cc.cfg)
    _refuse_rebuilt(why, allow_mismatch)
    recorded = ((rec or {}).get("models") or {}).get("fingerprints")
    if not isinstance(recorded, dict):
        return f"unchecked: {why if rec is None else 'its training cache records no model fingerprints'}"
    found = pair.fingerprints()
    names = {"base": pair.base_name, "chat": pair.chat_name}
    rec_names = (rec.get("models") or {})
    diff = [(m, fingerprint_differences(recorded.get(m), found[m])) for m in ("base", "chat")]
    diff = [(m, d) for m, d in diff if d]
    if not diff:
        return "same models"
    if allow_mismatch:
        return "allowed"
    parts = "; ".join(f"{m}: trained on {rec_names.get(m)!r} ({', '.join(f'{k} {short((recorded.get(m) or {}).get(k))}' for k in d)}), "
                      f"loaded {names[m]!r} ({', '.join(f'{k} {short(found[m][k])}' for k in d)})" for m, d in diff)
    raise ModelMismatchError(f"the models loaded are not the ones the crosscoder was trained on (its training cache "
                             f"{cc.cfg.cache} records their content fingerprints): {parts}. A model rebuilt at the same "
                             f"path, or other --base/--chat, gives numbers about other models: pass the models the cache "
                             f"was made with, or {ALLOW_MISMATCH} to use these deliberately")


def pair_for(cc: CrossCoder, *, base: str | None = None, chat: str | None = None, layer: int | None = None,
             dtype: str = "float32", device: str = "cpu", allow_mismatch: bool = False) -> ModelPair:
    """Load the model pair a crosscoder belongs to and check it is (:func:`check_models`; the result is in
    ``pair.models_check``). Models and layer default to those recorded in the manifest of the cache the
    crosscoder was trained on (``models.base``, ``models.chat``, ``layer``)."""
    rec, why = _training(cc.cfg)
    _refuse_rebuilt(why, allow_mismatch)  # before loading anything
    rec = rec or {}
    if not rec and allow_mismatch and cc.cfg.cache:  # a rebuilt training cache still names models
        try:
            rec = cache_manifest(cc.cfg.cache)[0]
        except CacheError:
            rec = {}
    models = rec.get("models") or {}
    base, chat = base or models.get("base"), chat or models.get("chat")
    layer = layer if layer is not None else rec.get("layer")
    if not base or not chat or layer is None:
        raise ConfigError("cannot tell which models and layer this crosscoder belongs to (its training cache "
                          f"{cc.cfg.cache!r} records none, is gone or was rebuilt): pass --base, --chat and --layer")
    if rec.get("layer") is not None and layer != rec["layer"] and not allow_mismatch:
        raise ModelMismatchError(f"the crosscoder was trained on layer {rec['layer']} but layer {layer} was asked "
                                 f"for: drop --layer, use a crosscoder trained on that layer, or pass {ALLOW_MISMATCH}")
    pair = load_pair(base, chat, layer=int(layer), dtype=dtype, device=device)
    if pair.d_model != cc.cfg.d_model:
        raise ModelMismatchError(f"the models have d_model={pair.d_model}, the crosscoder {cc.cfg.d_model}: "
                                 "pass the models the crosscoder was trained on")
    pair.models_check = check_models(pair, cc, allow_mismatch=allow_mismatch)
    return pair
