"""Which latents track a planted behaviour, and which latents to steer (DESIGN §1 "Steering").

Behaviour tracking: each latent's largest activation over a prompt, compared between the prompts that
trigger a behaviour and the others by AUROC (1 = fires more on every trigger prompt than on any other), for
every latent of every class. The latents steered by default: the most chat-specific chat-only latents, per
behaviour its best trackers over all live latents plus the best tracker of each class (so a shared detector
and the best chat-only one are both steered), and a few shared controls; each chosen latent records why.
The steering itself is :mod:`crossdiff_core.steering`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .behaviours import load_behaviours, rules
from .chat_rank import top_chat
from .crosscoder import CrossCoder
from .decoder_norms import CHAT_ONLY, CLASSES, DEAD, SHARED
from .generation import pad_token_id, render_prompts, right_pad
from .models import ModelPair


@torch.inference_mode()
def prompt_max_activations(pair: ModelPair, cc: CrossCoder, prompts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Each latent's largest code value over each rendered prompt (BOS excluded): ``[P, F]`` float32."""
    rows, pad = render_prompts(pair.tokenizer, prompts), pad_token_id(pair.tokenizer)
    F = cc.cfg.dict_size
    out = torch.zeros(len(rows), F, dtype=torch.float32, device=cc.W_dec.device)
    bos = pair.tokenizer.bos_token_id
    for a in range(0, len(rows), batch_size):
        ids, attn = right_pad(rows[a:a + batch_size], pad)  # positions match the cached ones
        h_b, h_c = pair.residuals(ids, attn)
        m = (attn.bool() & (ids != bos) if bos is not None else attn.bool()).to(h_b.device)
        x = torch.stack([h_b[m], h_c[m]], 1).to(device=cc.W_dec.device, dtype=torch.float32)
        codes = cc.eval().encode_sparse(x, batch_topk=False)
        prompt_of = torch.nonzero(m)[:, 0].to(codes.rows.device)[codes.rows] + a
        flat = out.view(-1)
        flat.scatter_reduce_(0, prompt_of * F + codes.latents, codes.values.float(), reduce="amax")
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of ``scores [P, F]`` for the ``positive [P]`` rows against the rest, per column (ties count
    half, via mid-ranks): ``[F]``; NaN when either side is empty."""
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[1], np.nan)
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).T.contiguous()  # [F, P]
    srt, order = torch.sort(s, dim=1)
    # mid-rank of each sorted value: tied values share the mean of the ranks they span (1-based)
    lo = torch.searchsorted(srt, srt, right=False)
    hi = torch.searchsorted(srt, srt, right=True)
    ranks = torch.empty_like(s).scatter_(1, order, (lo + hi + 1).double() / 2)
    r1 = ranks[:, torch.as_tensor(pos)].sum(1).numpy()
    return (r1 - n1 * (n1 + 1) / 2) / (n1 * n0)


def behaviour_tracking(pair: ModelPair, cc: CrossCoder, behaviours: Any, prompts: Sequence[dict] | None = None,
                       *, batch_size: int = 64) -> pd.DataFrame:
    """Per latent (all of them, every class) and behaviour: AUROC of the latent's prompt-max activation for
    the prompts that trigger the behaviour (``expected``) against all others, and its mean prompt-max
    activation on each side. ``behaviours``: a :class:`~crossdiff_core.behaviours.BehaviourSpec` (or what
    :func:`~crossdiff_core.behaviours.load_behaviours` reads); ``prompts``: default the spec's.
    Columns: ``latent``, then ``auroc_<b>``, ``mean_act_<b>``, ``mean_act_not_<b>`` per behaviour ``b``."""
    if prompts is None:
        prompts = load_behaviours(behaviours).prompts()
    prompts = list(prompts)
    acts = prompt_max_activations(pair, cc, [p["text"] for p in prompts], batch_size=batch_size).cpu().numpy()
    expected = np.array([p.get("expected") or "" for p in prompts])
    return tracking_table(acts, expected, [b.name for b in rules(behaviours)])


def tracking_table(acts: np.ndarray, expected: np.ndarray, behaviours: Sequence[str]) -> pd.DataFrame:
    """:func:`behaviour_tracking`'s table from the prompt-max activations ``acts [P, F]`` and what each prompt
    should trigger (``expected [P]``, "" for nothing), for the behaviour names ``behaviours``."""
    acts, expected = np.asarray(acts), np.asarray(expected)
    cols: dict[str, np.ndarray] = {"latent": np.arange(acts.shape[1], dtype=np.int64)}
    for name in behaviours:
        pos = expected == name
        cols[f"auroc_{name}"] = auroc(acts, pos)
        cols[f"mean_act_{name}"] = acts[pos].mean(0) if pos.any() else np.full(acts.shape[1], np.nan)
        cols[f"mean_act_not_{name}"] = acts[~pos].mean(0) if (~pos).any() else np.full(acts.shape[1], np.nan)
    return pd.DataFrame(cols)


def tracking_behaviours(tracking: pd.DataFrame) -> list[str]:
    """The behaviours a :func:`behaviour_tracking` table scores (its ``auroc_<b>`` columns, in order)."""
    return [c[len("auroc_"):] for c in tracking.columns if c.startswith("auroc_")]


def rank_trackers(table: pd.DataFrame, tracking: pd.DataFrame, behaviour: str) -> pd.DataFrame:
    """The live latents (fired, not dead) ranked as trackers of ``behaviour``: AUROC descending, ties to the
    chat-only class, then the lower ν rank, then the latent id. Columns: latent, class, nu_rank, auroc,
    mean_act, mean_act_not."""
    live = table[np.isfinite(table["max_act"].to_numpy(dtype=float)) & (table["class"] != DEAD)]
    keep = ["latent", "class"] + (["nu_rank"] if "nu_rank" in live else [])
    t = live[keep].merge(tracking[["latent", f"auroc_{behaviour}"] + [c for c in (f"mean_act_{behaviour}",
                                                                               f"mean_act_not_{behaviour}")
                                                                      if c in tracking]], on="latent")
    t = t.rename(columns={f"auroc_{behaviour}": "auroc", f"mean_act_{behaviour}": "mean_act",
                          f"mean_act_not_{behaviour}": "mean_act_not"})
    t = t[np.isfinite(t["auroc"].to_numpy(dtype=float))]
    if "nu_rank" not in t:
        t["nu_rank"] = np.nan
    t = t.assign(_co=t["class"] != CHAT_ONLY, _nu=t["nu_rank"].fillna(np.inf), _neg=-t["auroc"])
    return t.sort_values(["_neg", "_co", "_nu", "latent"], kind="stable").drop(columns=["_co", "_nu", "_neg"])


def tracking_summary(table: pd.DataFrame, tracking: pd.DataFrame, n: int = 5) -> dict[str, dict]:
    """Per behaviour: the ``n`` best trackers over all live latents and the best of each class
    (``{latent, class, auroc}``), for the steering results and the report."""
    out = {}
    for b in tracking_behaviours(tracking):
        r = rank_trackers(table, tracking, b)
        rec = lambda row: {"latent": int(row["latent"]), "class": str(row["class"]),  # noqa: E731
                           "auroc": float(row["auroc"])}
        out[b] = {"best": [rec(row) for _, row in r.head(n).iterrows()],
                  "best_by_class": {str(c): rec(g.iloc[0]) for c, g in r.groupby("class", sort=False)}}
    return out


def choose_latents(table: pd.DataFrame, *, n_top: int = 8, n_shared: int = 2, tracking: pd.DataFrame | None = None,
                   n_tracking: int = 4, seed: int = 0) -> list[dict]:
    """:func:`select_latents` with the reasons: ``[{"latent", "class", "reasons": [...]}]`` in steering
    order; a reason is ``nu_rank`` (most chat-specific chat-only), ``chat_rank`` (filling ``n_top`` from the
    most chat-specific live latents of any class, :func:`~crossdiff_core.chat_rank.top_chat`, when fewer than
    ``n_top`` latents are chat-only), ``tracks:<b>`` (among the ``n_tracking``
    best trackers of behaviour ``b`` over all live latents), ``best_<class>:<b>`` (the best tracker of its
    class) or ``shared_control``."""
    fired = table[np.isfinite(table["max_act"].to_numpy(dtype=float)) & (table["class"] != DEAD)]
    cls = dict(zip(fired["latent"].astype(int), fired["class"]))
    chosen: dict[int, list[str]] = {}

    def add(j: int, why: str) -> None:
        chosen.setdefault(int(j), []).append(why)

    co = fired[fired["class"] == CHAT_ONLY]
    t = co.assign(_nan=co["nu_rank"].isna()).sort_values(["_nan", "nu_rank", "latent"], kind="stable")
    for j in t["latent"].head(n_top):
        add(j, "nu_rank")
    if len(t) < n_top:  # few or no chat-only latents: the most chat-specific live latents of any class stand in
        for j in [j for j in top_chat(fired, n_top) if int(j) not in chosen][: n_top - len(t)]:
            add(j, "chat_rank")
    if tracking is not None:
        for b in tracking_behaviours(tracking):
            ranked = rank_trackers(fired, tracking, b)
            for j in ranked["latent"].head(n_tracking):
                add(j, f"tracks:{b}")
            for c in [c for c in CLASSES if c != DEAD]:
                best = ranked[ranked["class"] == c]["latent"].head(1)
                for j in best:
                    add(j, f"best_{c}:{b}")
    sh = fired[fired["class"] == SHARED]["latent"].to_numpy()
    if n_shared and sh.size:
        pick = np.random.default_rng(seed).choice(sh, min(n_shared, sh.size), replace=False)
        for j in np.sort(pick):
            if int(j) not in chosen:
                add(j, "shared_control")
    return [{"latent": j, "class": str(cls.get(j)), "reasons": why} for j, why in chosen.items()]


def select_latents(table: pd.DataFrame, *, n_top: int = 8, n_shared: int = 2, tracking: pd.DataFrame | None = None,
                   n_tracking: int = 4, seed: int = 0) -> list[int]:
    """Latents to steer (live ones only: finite ``max_act``, not dead): the ``n_top`` most chat-specific
    chat-only latents (lowest ν rank), filled up to ``n_top`` from the most chat-specific live latents of any
    class when fewer are chat-only; per tracked behaviour (``tracking``: :func:`behaviour_tracking`) its
    ``n_tracking`` best trackers over all live latents of every class (:func:`rank_trackers`: ties go to
    chat-only) and the best tracker of each class; then ``n_shared`` random shared latents (controls).
    Each latent once, in that order; :func:`choose_latents` says why each was chosen."""
    return [c["latent"] for c in choose_latents(table, n_top=n_top, n_shared=n_shared, tracking=tracking,
                                                n_tracking=n_tracking, seed=seed)]
