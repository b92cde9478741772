"""Latent cards (DESIGN §1 "Interpretation"): for each chat-only latent and a sample of shared ones, the
top-activating contexts with every token's activation, an activation histogram, and the latent's
statistics from ``latents.parquet`` (Δnorm, ν_ε, ν_r, template share, ...), plus steering results and
behaviour tracking when given.

One streaming pass over the activation cache keeps, for the card latents only, the ``k`` largest
activations and their cache rows (a running top-k merged batch by batch) and the histogram counts. The
contexts are then read back: the token table (only the parquet row groups that hold them) and the
activations of the context windows, encoded once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .cache import TOKENS, ActivationCache
from .analysis import check_compatible, check_finite_batch
from .config import from_dict, neutral
from .crosscoder import CrossCoder
from .chat_rank import N_TOP_CHAT, top_chat
from .decoder_norms import CHAT_ONLY, SHARED
from .errors import CacheError, ConfigError
from .models import resolve_device
from .runs import ALLOW_MISMATCH, CROSSCODER_SHA, read_latents

STAT_COLUMNS = ("class", "delta_norm", "cosine", "norm_base", "norm_chat", "freq", "max_act", "template_share",
                "nu_error", "nu_recon", "nu_rank")


@dataclass
class CardsConfig:
    """Settings of :func:`latent_cards` (params.yaml ``report.cards``, ``crossdiff cards``)."""

    n_contexts: int = 8  # top-activating contexts per latent
    before: int = 24  # tokens of context before the top token
    after: int = 6  # and after it
    bins: int = 20  # histogram bins over (0, max_act]
    n_shared: int = 16  # shared latents sampled for comparison
    max_chat_only: int | None = None  # cap on chat-only cards (most chat-specific by ν rank first); None: all
    n_top_chat: int = N_TOP_CHAT  # also the most chat-specific live latents of any class (crossdiff_core.chat_rank)
    seed: int = 0  # the shared sample
    batch_size: int = neutral(4096)  # cache rows per batch
    device: str = neutral("cpu")  # torch device
    progress: bool = neutral(True)  # progress bar
    allow_mismatch: bool = neutral(False)  # deliberate cross-use: a cache or latents.parquet not the crosscoder's own

    def __post_init__(self) -> None:
        if min(self.n_contexts, self.bins, self.batch_size) <= 0 or min(self.before, self.after, self.n_shared, self.n_top_chat) < 0:
            raise ConfigError(f"card settings must be positive (before/after/n_shared >= 0): {self}")

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "report.cards") -> "CardsConfig":
        """From params.yaml's ``report.cards`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


def card_latents(table: pd.DataFrame, *, n_shared: int = 16, seed: int = 0, max_chat_only: int | None = None,
                 n_top_chat: int = N_TOP_CHAT) -> np.ndarray:
    """Every chat-only latent that fired (ordered by ν rank, most chat-specific first; at most
    ``max_chat_only``), then the ``n_top_chat`` most chat-specific live latents of any class not listed yet
    (:func:`~crossdiff_core.chat_rank.top_chat`: cards even when nothing is chat-only), then ``n_shared``
    random shared latents that fired and are not listed yet (seeded, ordered by id)."""
    fired = table[np.isfinite(table["max_act"].to_numpy(dtype=float))]
    co = fired[fired["class"] == CHAT_ONLY]
    co = co.assign(_nan=co["nu_rank"].isna()).sort_values(["_nan", "nu_rank", "latent"], kind="stable")
    ids = co["latent"].to_numpy(np.int64)[:max_chat_only]
    listed = set(ids.tolist())
    ids = np.concatenate([ids, [j for j in top_chat(fired, n_top_chat) if j not in listed]]).astype(np.int64)
    sh = fired[fired["class"] == SHARED]["latent"].to_numpy(np.int64)
    sh = sh[~np.isin(sh, ids)]
    pick = np.sort(np.random.default_rng(seed).choice(sh, min(n_shared, sh.size), replace=False)) if sh.size else sh
    return np.concatenate([ids, pick.astype(np.int64)])


def codes_columns(codes, lut: torch.Tensor, n_cols: int, fill: float = 0.0) -> torch.Tensor:
    """Dense ``[N, n_cols]`` float32 block of sparse ``codes`` for the latents ``lut`` maps to a column
    (``lut [F]``: column or -1); other entries ``fill``."""
    col = lut[codes.latents]
    sel = col >= 0
    out = torch.full((codes.batch, n_cols), fill, dtype=torch.float32, device=codes.values.device)
    out[codes.rows[sel], col[sel]] = codes.values[sel].float()
    return out


class TopActivations:
    """Streaming top-``k`` activations with their cache rows, and histograms over ``(0, max_act]``, for a
    set of latents ``U``: ``values/rows [k, |U|]``, ``hist [|U|, bins]``, ``n_active [|U|]``."""

    def __init__(self, latents: np.ndarray, dict_size: int, max_act: np.ndarray, *, k: int, bins: int, device=None):
        self.U = torch.as_tensor(latents, dtype=torch.int64, device=device)
        self.lut = torch.full((dict_size,), -1, dtype=torch.int64, device=device)
        self.lut[self.U] = torch.arange(self.U.numel(), device=device)
        self.k, self.bins = k, bins
        m = torch.as_tensor(np.asarray(max_act, dtype=np.float32), device=device)
        self.max_act = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
        n = self.U.numel()
        self.values = torch.full((k, n), -math.inf, dtype=torch.float32, device=device)
        self.rows = torch.full((k, n), -1, dtype=torch.int64, device=device)
        self.hist = torch.zeros(n, bins, dtype=torch.int64, device=device)
        self.n_active = torch.zeros(n, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes, start: int) -> None:
        """``codes``: sparse codes of cache rows ``start .. start + codes.batch``."""
        u = self.lut[codes.latents]
        sel = u >= 0
        u, v = u[sel], codes.values[sel].float()
        n = self.U.numel()
        b = ((v / self.max_act[u]) * self.bins).long().clamp_(0, self.bins - 1)
        self.hist.view(-1).add_(torch.bincount(u * self.bins + b, minlength=n * self.bins))
        self.n_active += torch.bincount(u, minlength=n)
        top = torch.topk(codes_columns(codes, self.lut, n, -math.inf), min(self.k, codes.batch), dim=0)  # [k', n]
        vals = torch.cat([self.values, top.values])
        rws = torch.cat([self.rows, top.indices + start])
        best = torch.topk(vals, self.k, dim=0)
        self.values, self.rows = best.values, torch.gather(rws, 0, best.indices)


def _read_token_rows(cache, rows: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    """Rows ``rows`` (sorted, unique) of the cache's token table, reading only the row groups that hold them."""
    path = cache.path / TOKENS
    if not path.exists():
        raise CacheError(f"{path} is missing: latent cards need the token table; rebuild the cache with `crossdiff cache`")
    pf = pq.ParquetFile(path)
    sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], dtype=np.int64)
    if sizes.sum() != cache.n_tokens:
        raise CacheError(f"{path} has {sizes.sum()} rows but the cache has {cache.n_tokens} tokens: rebuild the cache")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = pf.read_row_groups(groups.tolist(), columns=list(columns)).to_pandas()
    offsets = np.concatenate([[0], np.cumsum(sizes[groups])])  # where each read group starts in `table`
    local = offsets[np.searchsorted(groups, group_of)] + rows - starts[group_of]
    return table.iloc[local].reset_index(drop=True)


def _read_rows(cache, rows: np.ndarray, device) -> torch.Tensor:
    """Activations of sorted unique cache ``rows``: ``[n, 2, d]`` float32, read in contiguous runs."""
    if rows.size == 0:
        return torch.zeros(0, 2, cache.d_model, device=device)
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    runs = np.split(rows, breaks)
    return torch.cat([cache.read_rows(int(r[0]), int(r[-1]) + 1, device=device) for r in runs])


def _steering_summary(steer: dict | None) -> dict[int, list[dict]]:
    if not steer:
        return {}
    return {int(lat["latent"]): lat["runs"] for lat in steer.get("latents", [])}


@torch.no_grad()
def latent_cards(cc: CrossCoder, cache, table: pd.DataFrame, latents: Sequence[int], tokenizer: Any,
                 cfg: CardsConfig | None = None, *, steering: dict | None = None,
                 tracking: pd.DataFrame | None = None) -> dict:
    """Cards of ``latents`` over ``cache`` (an :class:`~crossdiff_core.cache.ActivationCache` of the
    crosscoder's models). Returns ``{"cards": [...], "config": ..., "seconds": ...}``; each card holds the
    :data:`STAT_COLUMNS`, ``hist`` (``edges``, ``counts`` of the active tokens), ``n_active``, ``contexts``
    (``act``, ``sequence``, ``source``, ``tokens``, ``acts``, ``template``, ``focus`` = index of the top
    token), and ``steering`` / ``tracking`` when given."""
    cfg = cfg or CardsConfig()
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    cc = cc.to(device).eval()
    lat = np.asarray(latents, dtype=np.int64)
    F = cc.cfg.dict_size
    if lat.size and (lat.min() < 0 or lat.max() >= F):
        raise ConfigError(f"card latents must be in 0..{F - 1}: the latents table does not belong to this crosscoder")
    if cache.d_model != cc.cfg.d_model:
        raise ConfigError(f"the cache has d_model={cache.d_model}, the crosscoder {cc.cfg.d_model}: use the cache "
                          "of the models the crosscoder was trained on")
    stats = table.set_index("latent").reindex(lat)
    top = TopActivations(lat, F, stats["max_act"].to_numpy(float), k=cfg.n_contexts, bins=cfg.bins, device=device)
    n_batches = math.ceil(cache.n_tokens / cfg.batch_size)
    for start, x in tqdm(cache.iter_sequential(cfg.batch_size, device=device), total=n_batches,
                         disable=not cfg.progress, desc="cards", unit="batch"):
        check_finite_batch(x, cache, start)
        top.update(cc.encode_sparse(x, batch_topk=False), start)

    values, rows = top.values.cpu().numpy(), top.rows.cpu().numpy()  # [k, U]
    ok = np.isfinite(values) & (values > 0)
    centre = rows[ok]
    offsets = np.arange(-cfg.before, cfg.after + 1)
    win = np.clip(centre[:, None] + offsets[None, :], 0, cache.n_tokens - 1)  # [n_ctx, W]
    uniq = np.unique(np.concatenate([win.reshape(-1), centre]))
    tok = _read_token_rows(cache, uniq, ["sequence", "token_id", "is_template", "source"])
    seq = tok["sequence"].to_numpy()
    where = np.searchsorted(uniq, win)
    same = seq[where] == seq[np.searchsorted(uniq, centre)][:, None]  # window rows of the same conversation
    same &= (win == centre[:, None] + offsets[None, :])  # not clipped at the cache's ends
    # activations of every context row, for the card latents
    acts = torch.zeros(uniq.size, lat.size)
    for a in range(0, uniq.size, cfg.batch_size):
        x = _read_rows(cache, uniq[a:a + cfg.batch_size], device)
        acts[a:a + x.shape[0]] = codes_columns(cc.encode_sparse(x, batch_topk=False), top.lut, lat.size).cpu()
    acts = acts.numpy()
    ids = tok["token_id"].to_numpy()
    vocab = np.unique(ids)
    text = dict(zip(vocab.tolist(), tokenizer.batch_decode([[int(i)] for i in vocab], skip_special_tokens=False,
                                                             clean_up_tokenization_spaces=False)))
    runs = _steering_summary(steering)
    track = tracking.set_index("latent") if tracking is not None else None

    def num(v: Any) -> Any:
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, (np.integer,)):
            return int(v)
        return v

    cards = []
    # contexts are numbered in the order of rows[ok] (rank-major over [k, U])
    ctx_index = np.full(ok.size, -1)
    ctx_index[np.nonzero(ok.reshape(-1))[0]] = np.arange(int(ok.sum()))
    for u, j in enumerate(lat):
        s = stats.loc[j]
        contexts = []
        for r in range(cfg.n_contexts):
            if not ok[r, u]:
                continue
            c = ctx_index[r * lat.size + u]
            keep = same[c]
            w = where[c][keep]
            contexts.append({
                "act": float(values[r, u]), "sequence": int(seq[np.searchsorted(uniq, centre[c])]),
                "source": str(tok["source"].iloc[np.searchsorted(uniq, centre[c])]),
                "tokens": [text[int(t)] for t in ids[w]], "acts": np.round(acts[w, u], 4).tolist(),
                "template": tok["is_template"].to_numpy()[w].astype(bool).tolist(),
                "focus": int(np.nonzero(offsets[keep] == 0)[0][0]),
            })
        edges = np.linspace(0.0, float(top.max_act[u]), cfg.bins + 1)
        card = {"latent": int(j), **{c: num(s[c]) for c in STAT_COLUMNS if c in s.index},
                "n_active": int(top.n_active[u]), "hist": {"edges": np.round(edges, 5).tolist(),
                                                           "counts": top.hist[u].tolist()},
                "contexts": contexts}
        if int(j) in runs:
            card["steering"] = runs[int(j)]
        if track is not None and int(j) in track.index:
            card["tracking"] = {k: num(v) for k, v in track.loc[int(j)].items()}
        cards.append(card)
    return {"cards": cards, "n_tokens": cache.n_tokens, "config": asdict(cfg), "seconds": time.perf_counter() - t0}


def cards_for(crosscoder: str | os.PathLike, latents: str | os.PathLike, cache_dir: str | os.PathLike,
              cfg: CardsConfig | None = None, *, steering: dict | None = None, tracking: pd.DataFrame | None = None,
              tokenizer: str | None = None) -> dict:
    """:func:`latent_cards` of :func:`card_latents` for a crosscoder directory, its ``latents.parquet`` and
    an activation cache; the tokenizer defaults to the chat model the cache records."""
    from transformers import AutoTokenizer

    cfg = cfg or CardsConfig()
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # a missing GPU refused before work
    cc = CrossCoder.load(crosscoder, device=cfg.device)
    table = read_latents(latents, cc, allow_mismatch=cfg.allow_mismatch)
    cache = ActivationCache(cache_dir)
    match = check_compatible(cc, cache, allow_other_cache=cfg.allow_mismatch, flag=ALLOW_MISMATCH)
    tok_dir = tokenizer or (cache.manifest.get("models") or {}).get("chat")
    if not tok_dir:
        raise ConfigError(f"the cache {cache_dir} records no chat model: pass the tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer from {tok_dir!r} ({exc}): pass the tokenizer directory") from exc
    chosen = card_latents(table, n_shared=cfg.n_shared, seed=cfg.seed, max_chat_only=cfg.max_chat_only,
                          n_top_chat=cfg.n_top_chat)
    res = latent_cards(cc, cache, table, chosen, tok, cfg, steering=steering, tracking=tracking)
    res["inputs"] = {"crosscoder": str(crosscoder), CROSSCODER_SHA: cc.weights_sha256, "latents": str(latents),
                     "cache": str(cache_dir), "cache_match": match, "tokenizer": tok_dir}
    return res
