"""Latent analysis of a trained crosscoder over an activation cache (DESIGN §1 "Decoder-norm
statistics", "Latent Scaling", "Interpretation"; §2 ``latents.parquet``).

One streaming pass over the cache (encode, decode, then additive float64 sums) gives, per latent:
firing frequency, max activation, template-token share, the four Latent Scaling β and the co-firing
counts of the decoupling-suspect pairs (found from the decoders before the pass, so their counts
are accumulated in the same pass). Everything else comes from the decoders.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .config import from_dict, neutral
from .cache import ActivationCache
from .crosscoder import Codes, CrossCoder, firing_counts
from .fileio import write_json
from .decoder_norms import BASE_ONLY, CHAT_ONLY, CLASSES, DEAD, decoder_stats
from .errors import CacheError, ConfigError, CrossdiffError, ModelMismatchError
from .latent_scaling import (DIRECTIONS, MIN_SHARED_FIRES, NU_ERROR_MAX, NU_RECON_MAX, SHARED_COVERAGE,
                             LatentScaling, compute_nu, data_driven_filter, direction_models, fixed_filter,
                             sparse_codes, use_dense)
from .normalisation import scales_summary
from .report.figures import plot_all
from .models import fingerprint_differences, resolve_device
from .runs import CROSSCODER_SHA, LATENT_COLUMNS, default_summary_path, short, training_manifest, write_latents

DECOUPLING_COSINE = 0.9


@dataclass
class AnalysisConfig:
    """Settings of :func:`analyze` (params.yaml ``analyze``); :func:`~crossdiff_core.config.neutral`
    fields leave latents.parquet and the summary unchanged."""

    direction: str = "auto"  # Latent Scaling direction: auto (base row for base-only), chat, base
    nu_error_max: float = NU_ERROR_MAX  # fixed filter: chat-specific needs ν_error below this
    nu_recon_max: float = NU_RECON_MAX  # fixed filter: chat-specific needs ν_recon below this
    coverage: float = SHARED_COVERAGE  # data-driven cut: central interval of the shared latents' ν
    min_shared_fires: int = MIN_SHARED_FIRES  # ... over the shared latents that fired on at least this many tokens
    decoupling_cosine: float = DECOUPLING_COSINE  # decoupling suspects: chat-only/base-only decoder cosine above this
    max_pairs_listed: int = 10_000  # decoupling pairs written into the summary (all are counted)
    batch_size: int = neutral(4096)  # tokens per batch of the streaming pass
    allow_other_cache: bool = neutral(False)  # deliberate cross-use: skip the check that the cache holds the crosscoder's models
    device: str = neutral("cpu")  # torch device
    progress: bool = neutral(True)  # progress bar
    keep_freed_memory: bool = neutral(True)  # CPU: reuse the freed [batch, F] pages between batches (crossdiff_core.allocator)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 < self.coverage < 1:
            raise ConfigError(f"coverage must be in (0, 1), got {self.coverage}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.min_shared_fires < 0:
            raise ConfigError(f"min_shared_fires must be >= 0, got {self.min_shared_fires}")
        if not all(math.isfinite(v) for v in (self.nu_error_max, self.nu_recon_max)):
            raise ConfigError(f"nu_error_max and nu_recon_max must be finite numbers, got {self.nu_error_max}, "
                              f"{self.nu_recon_max}")
        if not -1 <= self.decoupling_cosine <= 1:
            raise ConfigError(f"decoupling_cosine must be in [-1, 1], got {self.decoupling_cosine}")

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "analyze") -> "AnalysisConfig":
        """From params.yaml's ``analyze`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


# ---- per-latent activation statistics -----------------------------------------------------------

class LatentStats:
    """Streaming firing count, ``Σ f``, ``Σ f`` on template tokens and ``max f`` per latent (``[F]``)."""

    def __init__(self, dict_size: int, device=None):
        self.count = torch.zeros(dict_size, dtype=torch.int64, device=device)
        self.sum_f = torch.zeros(dict_size, dtype=torch.float64, device=device)
        self.sum_f_template = torch.zeros(dict_size, dtype=torch.float64, device=device)
        self.max_f = torch.zeros(dict_size, dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes: Codes | torch.Tensor, is_template: torch.Tensor | None) -> None:
        """``codes`` of a batch of N tokens (sparse, or dense ``[N, F]``); ``is_template [N]`` bool (None:
        template share unknown)."""
        if isinstance(codes, torch.Tensor):
            f = codes.float()
            self.count += firing_counts(f).long()
            self.sum_f += f.sum(0).double()
            if is_template is not None:
                self.sum_f_template += (is_template.to(f.dtype) @ f).double()
            torch.maximum(self.max_f, f.amax(0), out=self.max_f)
            self.n_tokens += f.shape[0]
            return
        lat, v = codes.latents, codes.values.float()
        self.count += torch.bincount(lat, minlength=self.count.numel())
        self.sum_f.index_add_(0, lat, v.double())
        if is_template is not None:
            self.sum_f_template.index_add_(0, lat, (v * is_template[codes.rows].to(v.dtype)).double())
        self.max_f.scatter_reduce_(0, lat, v, reduce="amax")
        self.n_tokens += codes.batch

    def result(self, template_known: bool = True) -> dict[str, torch.Tensor]:
        """``freq`` (share of tokens where the latent fires), ``max_act`` (largest code value f, NaN if
        never fired), ``template_share`` (``Σ f`` on template tokens / ``Σ f``; NaN if never fired)."""
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.sum_f.device)
        fired = self.count > 0
        share = torch.where(self.sum_f > 0, self.sum_f_template / self.sum_f.clamp_min(1e-300), nan)
        if not template_known:
            share = torch.full_like(share, float("nan"))
        return {"freq": self.count.double() / max(1, self.n_tokens),
                "max_act": torch.where(fired, self.max_f.double(), nan),
                "template_share": share}


# ---- decoupling suspects ------------------------------------------------------------------------

def decoupling_candidates(W_dec: torch.Tensor, class_codes: torch.Tensor, *, min_cosine: float = DECOUPLING_COSINE,
                          chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (chat-only ``i``, base-only ``j``) with ``cos(d_i^c, d_j^b) > min_cosine``.

    ``W_dec [2, F, d]`` -> ``(chat_latent [P], base_latent [P], cosine [P])``, sorted by cosine
    descending. One ``[n_chat, d]×[d, n_base]`` product, in row chunks to bound memory.
    """
    ci = torch.nonzero(class_codes == CLASSES.index(CHAT_ONLY)).squeeze(1)
    bi = torch.nonzero(class_codes == CLASSES.index(BASE_ONLY)).squeeze(1)
    W = W_dec.detach().float()
    A = torch.nn.functional.normalize(W[1, ci], dim=-1, eps=1e-12)  # chat rows of chat-only latents
    B = torch.nn.functional.normalize(W[0, bi], dim=-1, eps=1e-12)  # base rows of base-only latents
    out_i, out_j, out_c = [], [], []
    step = max(1, chunk_elems // max(1, bi.numel()))
    for a in range(0, ci.numel(), step):
        C = A[a:a + step] @ B.T
        r, c = torch.nonzero(C > min_cosine, as_tuple=True)
        out_i.append(ci[a + r])
        out_j.append(bi[c])
        out_c.append(C[r, c])
    if not out_i:
        empty = torch.zeros(0, dtype=torch.int64, device=W.device)
        return empty, empty.clone(), torch.zeros(0, device=W.device)
    i, j, c = torch.cat(out_i), torch.cat(out_j), torch.cat(out_c)
    o = torch.sort(c, descending=True, stable=True).indices
    return i[o], j[o], c[o]


class CoFiring:
    """Streaming count of tokens on which both latents of each pair fire: ``[P]`` int64."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, dict_size: int, *, chunk_elems: int = 1 << 24):
        self.left, self.right = left, right
        involved = torch.unique(torch.cat([left, right]))
        self.lut = torch.full((dict_size,), -1, dtype=torch.int64, device=left.device)
        self.lut[involved] = torch.arange(involved.numel(), device=left.device)
        self.involved, self.n_inv = involved, involved.numel()
        self.li, self.ri = self.lut[left], self.lut[right]
        self.both = torch.zeros(left.numel(), dtype=torch.int64, device=left.device)
        self.chunk_elems = chunk_elems

    @torch.no_grad()
    def update(self, codes: Codes | torch.Tensor) -> None:
        """``codes`` of a batch: sparse, or dense ``[N, F]``."""
        if self.left.numel() == 0:
            return
        if isinstance(codes, torch.Tensor):
            M = codes[:, self.involved] > 0  # [N, involved]
        else:
            k = self.lut[codes.latents]
            sel = k >= 0
            M = torch.zeros(codes.batch, self.n_inv, dtype=torch.bool, device=k.device)
            M[codes.rows[sel], k[sel]] = True
        step = max(1, self.chunk_elems // max(1, M.shape[0]))
        for a in range(0, self.left.numel(), step):  # chunks of pairs (bounded memory)
            self.both[a:a + step] += (M[:, self.li[a:a + step]] & M[:, self.ri[a:a + step]]).sum(0)


# ---- checks -------------------------------------------------------------------------------------

def check_compatible(model: CrossCoder, cache, *, allow_other_cache: bool = False,
                     flag: str = "--allow-other-cache") -> str:
    """Raise :class:`ModelMismatchError` if ``cache`` cannot hold the activations ``model`` was trained on.

    Identity is by content, not by path: the same cache is the same manifest hash; another cache must
    record the same layer and the same model content fingerprints (``models.fingerprints``, see
    :func:`~crossdiff_core.models.model_fingerprint`) as the training cache, so a model pair rebuilt at the
    same path is caught. Returns ``"same cache"``, ``"same models"``, ``"unchecked"`` (the crosscoder
    records no cache hash) or ``"allowed"`` (``allow_other_cache``; ``flag``: its name in messages).
    """
    cfg = model.cfg
    if cache.d_model != cfg.d_model:
        raise ModelMismatchError(
            f"the cache {cache.path} has d_model={cache.d_model} but the crosscoder expects {cfg.d_model}: "
            "analyse the crosscoder on a cache of the models and layer it was trained on"
        )
    if cfg.cache_manifest_hash is None:
        return "unchecked"
    if cfg.cache_manifest_hash == cache.manifest_hash:
        return "same cache"
    if allow_other_cache:
        return "allowed"
    fix = (f"use the cache it was trained on, or pass {flag} if this cache deliberately holds activations of "
           "other models (the numbers then describe those)")
    trained_side = f"trained on {cfg.cache} (manifest sha256 {short(cfg.cache_manifest_hash)})"
    here_side = f"{cache.path} (manifest sha256 {short(cache.manifest_hash)})"
    trained = training_manifest(cfg)
    there_fp = ((trained or {}).get("models") or {}).get("fingerprints")
    here_fp = (cache.manifest.get("models") or {}).get("fingerprints")
    if not isinstance(there_fp, dict) or not isinstance(here_fp, dict):
        why = ("the training cache is gone, unreadable or rebuilt since" if trained is None else
               "the training cache records no model fingerprints" if not isinstance(there_fp, dict) else
               "this cache records no model fingerprints")
        raise ModelMismatchError(f"the crosscoder was {trained_side}, and {here_side} is another cache whose models "
                                 f"cannot be compared ({why}): {fix}")
    diff = [f"{m} ({', '.join(d)})" for m in ("base", "chat")
            if (d := fingerprint_differences(there_fp.get(m), here_fp.get(m)))]
    if trained.get("layer") != cache.manifest.get("layer"):
        diff.append(f"layer ({trained.get('layer')} vs {cache.manifest.get('layer')})")
    if diff:
        names = lambda m: {k: (m.get("models") or {}).get(k) for k in ("base", "chat")}  # noqa: E731
        raise ModelMismatchError(
            f"the crosscoder was {trained_side}, models {names(trained)}, but {here_side} holds activations of other "
            f"content, models {names(cache.manifest)}: {'; '.join(diff)} differ: {fix}")
    return "same models"


def check_finite_batch(x: torch.Tensor, cache, start: int) -> None:
    """Refuse a batch ``x [n, 2, d]`` of cache rows ``start..start+n`` holding NaN/inf (one reduction)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
    models = [m for i, m in enumerate(("base", "chat")) if not bool(torch.isfinite(x[:, i]).all())]
    raise CacheError(f"the activation cache {cache.path} holds NaN or inf activations ({'/'.join(models)}) in rows "
                     f"{start + int(bad[0])}..{start + int(bad[-1])} ({bad.numel()} rows of this batch): "
                     f"nothing can be measured on them; `crossdiff cache-info --cache {cache.path}` names the shards, "
                     "rebuild the cache with `crossdiff cache`")


# ---- the pass -----------------------------------------------------------------------------------

@dataclass
class AnalysisResult:
    """``table``: one row per latent (:data:`LATENT_COLUMNS`); ``pairs``: decoupling suspects;
    ``summary``: the JSON summary; ``filters``: ``[F]`` bool masks of the chat-only latents that pass
    ``fixed``, ``data_driven`` and ``both``."""

    table: pd.DataFrame
    pairs: pd.DataFrame
    summary: dict
    filters: dict[str, np.ndarray] = field(default_factory=dict)


def _template_column(cache) -> "pa.ChunkedArray | None":
    try:
        return cache.tokens(columns=["is_template"]).column("is_template")
    except CacheError as e:
        warnings.warn(f"template_share will be NaN: {e}", stacklevel=3)
        return None


@torch.no_grad()
def analyze(model: CrossCoder, cache, cfg: AnalysisConfig | None = None) -> AnalysisResult:
    """Per-latent statistics, Latent Scaling, filters and decoupling suspects of ``model`` over ``cache``
    (an :class:`~crossdiff_core.cache.ActivationCache`), in one streaming pass of ``cfg.batch_size`` rows.
    ``model`` is moved to ``cfg.device`` and put in eval mode (BatchTopK then uses its threshold)."""
    cfg = cfg or AnalysisConfig()
    t0 = time.perf_counter()
    if cache.n_tokens <= 0:
        raise CacheError(f"the cache {cache.path} holds no tokens: cache some data with `crossdiff cache` first")
    match = check_compatible(model, cache, allow_other_cache=cfg.allow_other_cache)
    bad = model.nonfinite_weights()
    if bad:
        raise CrossdiffError(f"the crosscoder's weights {bad} hold NaN or inf: retrain it")
    device = torch.device(cfg.device)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    model = model.to(device).eval()
    if model.cfg.sparsity == "batchtopk" and not bool(torch.isfinite(model.threshold)):
        raise CrossdiffError(f"this {model.cfg.kind} crosscoder has no inference threshold (it stopped before warm-up "
                             "ended): train it for more steps before analysing it")
    F = model.cfg.dict_size
    dec = decoder_stats(model.W_dec)
    cls = dec["class_code"]
    dir_model = direction_models(cls, cfg.direction)
    ls = LatentScaling(model.W_dec, dir_model)
    stats = LatentStats(F, device=device)
    pi, pj, pc = decoupling_candidates(model.W_dec, cls, min_cosine=cfg.decoupling_cosine)
    cof = CoFiring(pi, pj, F)
    tmpl = _template_column(cache)

    n_batches = math.ceil(cache.n_tokens / cfg.batch_size)
    for start, x in tqdm(cache.iter_sequential(cfg.batch_size, dtype=torch.float32, device=device),
                         total=n_batches, disable=not cfg.progress, desc="analyse", unit="batch"):
        check_finite_batch(x, cache, start)
        xn = model.normalise(x)
        if model.cfg.sparsity == "l1":
            # L1 codes can be dense: keep them dense (GEMMs) unless sparse products are cheaper
            f = model.encode(xn, normalised=True)
            # the density from every 8th token decides (an exact count costs a third of the encode at small F)
            sample = f[::8]
            dense = use_dense(int(torch.count_nonzero(sample)), sample.shape[0], F, model.cfg.d_model)
            codes = f if dense else sparse_codes(f)
        else:
            codes = model.encode_sparse(xn, normalised=True)
        x_hat = model.decode_normalised(codes)
        ls.update(codes, xn, x_hat)
        is_t = None
        if tmpl is not None:
            mask = tmpl.slice(start, x.shape[0]).to_numpy(zero_copy_only=False).astype(np.bool_)
            is_t = torch.from_numpy(mask).to(device)
        stats.update(codes, is_t)
        cof.update(codes)
    seconds = time.perf_counter() - t0

    # a latent that never fired on these tokens is class dead whatever its Δnorm (a dead one keeps its init's
    # 0.5, which would read as "shared"); it leaves the chat-only set, the pairs and the shared ν interval
    fired = stats.count > 0
    cls = torch.where(fired, cls, CLASSES.index(DEAD))
    live_pair = fired[pi] & fired[pj]
    pi, pj, pc, cof_both = pi[live_pair], pj[live_pair], pc[live_pair], cof.both[live_pair]
    betas = ls.betas()
    nus = compute_nu(betas, cls)
    act = stats.result(template_known=tmpl is not None)
    chat_only = cls == CLASSES.index(CHAT_ONLY)
    fixed = chat_only & fixed_filter(nus.nu_error, nus.nu_recon, nu_error_max=cfg.nu_error_max,
                                     nu_recon_max=cfg.nu_recon_max)
    cut = data_driven_filter(nus.nu_error, nus.nu_recon, cls, coverage=cfg.coverage,
                             reference=stats.count >= cfg.min_shared_fires)
    dd = cut.passed & chat_only

    def np64(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().cpu().numpy()

    table = pd.DataFrame({
        "latent": np.arange(F, dtype=np.int64),
        "norm_base": np64(dec["norm_base"]), "norm_chat": np64(dec["norm_chat"]),
        "delta_norm": np64(dec["delta_norm"]), "cosine": np64(dec["cosine"]),
        "class": pd.Categorical.from_codes(cls.cpu().numpy(), categories=list(CLASSES)).astype(str),
        "freq": np64(act["freq"]), "max_act": np64(act["max_act"]), "template_share": np64(act["template_share"]),
        "beta_error_base": np64(betas["error_base"]), "beta_error_chat": np64(betas["error_chat"]),
        "beta_recon_base": np64(betas["recon_base"]), "beta_recon_chat": np64(betas["recon_chat"]),
        "nu_error": np64(nus.nu_error), "nu_recon": np64(nus.nu_recon), "nu_rank": np64(nus.nu_rank),
    }, columns=list(LATENT_COLUMNS))

    n_i, n_j, n_ij = (np64(t) for t in (stats.count[pi], stats.count[pj], cof_both))
    with np.errstate(invalid="ignore", divide="ignore"):
        pairs = pd.DataFrame({
            "chat_latent": pi.cpu().numpy(), "base_latent": pj.cpu().numpy(), "cosine": np64(pc),
            "fires_chat": n_i.astype(np.int64), "fires_base": n_j.astype(np.int64), "fires_both": n_ij.astype(np.int64),
            # share of the chat-only latent's firings where the base-only one fires too, and the converse
            "cofire_given_chat": np.where(n_i > 0, n_ij / n_i, np.nan),
            "cofire_given_base": np.where(n_j > 0, n_ij / n_j, np.nan),
            "jaccard": np.where(n_i + n_j - n_ij > 0, n_ij / (n_i + n_j - n_ij), np.nan),
        })

    summary = _summary(model, cache, cfg, table, pairs, fixed, cut, dd, chat_only, match, seconds, ls.n_tokens)
    both_mask = (fixed & dd).cpu().numpy()
    return AnalysisResult(table, pairs, summary,
                          {"fixed": fixed.cpu().numpy(), "data_driven": dd.cpu().numpy(), "both": both_mask})


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _summary(model, cache, cfg, table, pairs, fixed, cut, dd, chat_only, match, seconds, n_tokens) -> dict:
    chat = chat_only.cpu().numpy()
    fixed, dd = fixed.cpu().numpy(), dd.cpu().numpy()
    fired = (table["freq"] > 0).to_numpy()
    cls = table["class"].to_numpy()
    ne, nr = table["nu_error"].to_numpy(), table["nu_recon"].to_numpy()
    finite = chat & np.isfinite(ne) & np.isfinite(nr)
    listed = pairs.head(cfg.max_pairs_listed)

    def median(v: np.ndarray) -> float | None:
        return _finite(float(np.median(v[finite]))) if finite.any() else None

    return {
        "crosscoder": {"kind": model.cfg.kind, "d_model": model.cfg.d_model, "dict_size": model.cfg.dict_size,
                       "k": model.cfg.k, "l1_coeff": model.cfg.l1_coeff, "trained_on": model.cfg.cache,
                       CROSSCODER_SHA: getattr(model, CROSSCODER_SHA, None)},
        "cache": {"path": str(cache.path), "manifest_hash": cache.manifest_hash, "n_tokens": n_tokens,
                  "match": match},
        "direction": cfg.direction,
        "scales": scales_summary(model.scales.cpu(), model.cfg.normalisation,
                                 {m: cache.manifest["stats"][m]["mean_sq_norm"] for m in ("base", "chat")}),
        "classes": {c: int((cls == c).sum()) for c in CLASSES},
        "fired": {c: int((fired & (cls == c)).sum()) for c in CLASSES},
        "dead": int((~fired).sum()),
        "chat_only": {"total": int(chat.sum()), "with_finite_nu": int(finite.sum()),
                      "nu_error_median": median(ne), "nu_recon_median": median(nr)},
        "nu_rank": "rank(nu_error) + rank(nu_recon), 1-based ascending ranks within the latent's class "
                   "(ties by latent index); lower = more chat-specific; NaN where a nu is NaN",
        "filters": {
            "fixed": {"nu_error_max": cfg.nu_error_max, "nu_recon_max": cfg.nu_recon_max,
                      "rule": "chat-only latent with nu_error < nu_error_max and nu_recon < nu_recon_max",
                      "survivors": int(fixed.sum()), "latents": np.nonzero(fixed)[0].tolist()},
            "data_driven": {"coverage": cut.coverage, "min_shared_fires": cfg.min_shared_fires,
                            "n_shared": cut.n_shared,
                            "shared_nu_error_interval": [_finite(v) for v in cut.nu_error_interval],
                            "shared_nu_recon_interval": [_finite(v) for v in cut.nu_recon_interval],
                            "rule": "chat-only latent with nu_error < lower end of the central `coverage` interval "
                                    "of nu_error over the shared latents that fired >= min_shared_fires times, "
                                    "and nu_recon < the lower end of theirs",
                            "survivors": int(dd.sum()), "latents": np.nonzero(dd)[0].tolist()},
            "both": {"survivors": int((fixed & dd).sum()), "latents": np.nonzero(fixed & dd)[0].tolist()},
        },
        "decoupling": {"min_cosine": cfg.decoupling_cosine, "n_pairs": int(len(pairs)),
                       "n_chat_latents": int(pairs["chat_latent"].nunique()),
                       "n_base_latents": int(pairs["base_latent"].nunique()),
                       "n_cofiring_pairs": int((pairs["cofire_given_chat"] > 0.5).sum()),
                       "cofiring_rule": "fires_both / fires_chat > 0.5",
                       "pairs": json.loads(listed.to_json(orient="records")),
                       "pairs_listed": int(len(listed))},
        "seconds": seconds,
    }


# ---- the stage ---------------------------------------------------------------------------------

def run_analysis(crosscoder_dir: str | os.PathLike, cache_dir: str | os.PathLike, out: str | os.PathLike, *,
                 summary_path: str | os.PathLike | None = None, plots_dir: str | os.PathLike | None = None,
                 cfg: AnalysisConfig | None = None) -> AnalysisResult:
    """Load, :func:`analyze`, and write ``latents.parquet``, the summary JSON and (optionally) the PNG plots."""
    cfg = cfg or AnalysisConfig()
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" resolved; a missing GPU refused before work
    model = CrossCoder.load(crosscoder_dir, device=cfg.device)
    cache = ActivationCache(cache_dir)
    res = analyze(model, cache, cfg)
    res.summary["crosscoder"]["path"] = str(Path(crosscoder_dir))
    res.summary["settings"] = asdict(cfg)
    if plots_dir is not None:
        res.summary["plots"] = [str(p) for p in plot_all(res.table, res.summary, plots_dir)]
    write_latents(res.table, out, metadata={k: res.summary[k] for k in ("crosscoder", "cache", "direction", "settings")})
    write_json(res.summary, summary_path or default_summary_path(out))
    return res
