"""The report's "What changed" verdict for one crosscoder: the strongest evidence found about the fine-tune, and
what was looked for and not found (issue 12: something to say even when no latent crosses Δnorm 0.9).

Evidence, in order: the chat-only class (Δnorm > 0.9); the most chat-specific live latents of any class
(:func:`~crossdiff_core.chat_rank.chat_ranking`) with their Δnorm and ν; the share of the KL gap their
``top_chat`` patch set closes against random sets of as many live latents; which of them track a behaviour
(AUROC ≥ :data:`TRACKS`) and which steer one. Caveats: the normalisation's scale warning and the dead share.
Kept apart from the per-behaviour verdicts of :mod:`.numbers`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..chat_rank import N_TOP_CHAT, RULE, chat_ranking
from ..decoder_norms import CHAT_ONLY, DEAD
from ..steering import behaviour_effects, behaviour_names, raising_runs
from .inputs import RunInputs

TRACKS = 0.9  # a latent "tracks" a behaviour at prompt-level AUROC >= this
N_NAMED = 5  # latents named in the text


def _kl_sets(run: RunInputs) -> tuple[dict | None, dict | None]:
    """The ``top_chat`` set's record and the ``top_chat_random`` group's, from the KL evaluation."""
    if not run.kl:
        return None, None
    top = next((s for s in run.kl.get("sets", []) if s["name"] == "top_chat"), None)
    return top, (run.kl.get("groups") or {}).get("top_chat_random")


def _top_n(run: RunInputs, top_set: dict | None) -> int:
    return int(top_set["size"]) if top_set and top_set.get("size") else N_TOP_CHAT


def _trackers(run: RunInputs, top: set[int]) -> dict[str, list[dict]]:
    """Per behaviour: the latents among ``top`` whose tracking AUROC is >= :data:`TRACKS`, best first."""
    t = run.tracking
    out: dict[str, list[dict]] = {}
    if t is None:
        return out
    for col in [c for c in t.columns if c.startswith("auroc_")]:
        rows = t[t["latent"].isin(top) & (t[col] >= TRACKS)].sort_values([col, "latent"], ascending=[False, True])
        if len(rows):
            out[col[len("auroc_"):]] = [{"latent": int(r["latent"]), "auroc": float(r[col])} for _, r in rows.iterrows()]
    return out


def _steered(run: RunInputs, top: set[int]) -> list[dict]:
    """Steering runs of latents among ``top`` that raise a behaviour (base: on its triggers; chat: elsewhere)."""
    if not run.steering or not run.steering.get("has_ground_truth"):
        return []
    out = []
    for b in behaviour_names(run.steering):
        for model, rise, rate in (("base", "rise", "trigger_rate"), ("chat", "other_rise", "other_rate")):
            eff = behaviour_effects(run.steering, b, model)
            if eff.empty:
                continue
            up = raising_runs(eff[eff["latent"].isin(top)], rise)
            if len(up):
                r = up.iloc[0]
                out.append({"behaviour": b, "model": model, "latent": int(r["latent"]), "alpha": float(r["alpha"]),
                            "from": float(r[f"{rate}_unsteered"]), "to": float(r[rate]),
                            "n_latents": int(up["latent"].nunique())})
    return out


def _pct(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{100 * float(v):.0f}%"


def what_changed(run: RunInputs) -> dict:
    """The verdict: ``{"text", "found", "chat_only", "top_chat": {n, rule, delta_norm_range, latents}, "kl",
    "tracks", "steers", "scales_warning", "dead_fraction", "not_found": [...]}``; ``found`` is True when some
    evidence beyond the ranking itself is there (chat-only latents, a top set that beats random, a tracker
    or a steering effect)."""
    table, s = run.latents, run.summary
    top_set, rand = _kl_sets(run)
    rank = chat_ranking(table)
    n = _top_n(run, top_set)
    top = rank.head(n)
    ids = set(top["latent"].astype(int))
    n_co = int(((table["class"] == CHAT_ONLY)).sum())
    n_dead = int((table["class"] == DEAD).sum())
    dead_frac = n_dead / max(1, len(table))
    named = [{"latent": int(r["latent"]), "class": str(r["class"]), "delta_norm": float(r["delta_norm"]),
              "nu_error": None if pd.isna(r["nu_error"]) else float(r["nu_error"]),
              "nu_recon": None if pd.isna(r["nu_recon"]) else float(r["nu_recon"])} for _, r in top.iterrows()]
    parts, not_found = [], []
    if n_co:
        parts.append(f"{n_co} latents crossed Δnorm 0.9 (chat-only).")
    else:
        not_found.append("no latent crossed Δnorm 0.9 (the chat-only class is empty)")
    lo = hi = None
    if len(top):
        lo, hi = float(top["delta_norm"].min()), float(top["delta_norm"].max())
        shown = "; ".join(f"{d['latent']} (Δnorm {d['delta_norm']:.2f}, ν_ε {_fmt(d['nu_error'])}, "
                          f"ν_r {_fmt(d['nu_recon'])})" for d in named[:N_NAMED])
        parts.append(f"The {len(top)} most chat-specific live latents (Δnorm {lo:.2f}–{hi:.2f}) start with {shown}.")
    else:
        not_found.append("no latent fired: nothing to rank")
    kl = None
    if top_set is not None:
        g = top_set["gap_closed"].get("first9")
        r_mean = (rand or {}).get("gap_closed_mean", {}).get("first9")
        kl = {"top_chat_first9": g, "random_first9": r_mean, "n_random": (rand or {}).get("n_sets", 0)}
        parts.append(f"Patched into the chat model they close {_pct(g)} of the KL gap on the first 9 answer tokens"
                     + (f", vs {_pct(r_mean)} for random sets of as many live latents." if r_mean is not None else "."))
        if g is not None and r_mean is not None and not g > r_mean:
            not_found.append("the most chat-specific latents close no more of the KL gap than random latents")
    else:
        not_found.append("no KL evaluation of the top set (run `crossdiff evaluate`)")
    tracks = _trackers(run, ids)
    for b, lst in tracks.items():
        parts.append(f"Of them, {', '.join(str(t['latent']) for t in lst[:N_NAMED])} track {b} (AUROC ≥ {TRACKS}).")
    if run.tracking is not None and not tracks:
        not_found.append(f"none of them tracks a behaviour (AUROC ≥ {TRACKS})")
    steers = _steered(run, ids)
    for st in steers:
        where = "on its trigger prompts" if st["model"] == "base" else "on prompts that do not trigger it"
        parts.append(f"Steering latent {st['latent']} (a = {st['alpha']:g}) raises {st['behaviour']} in the "
                     f"{st['model']} model {where} from {_pct(st['from'])} to {_pct(st['to'])}.")
    if run.steering and run.steering.get("has_ground_truth") and not steers:
        not_found.append("steering none of them raised a behaviour")
    warn = (s.get("scales") or {}).get("warning")  # shown next to the verdict, not in it
    if dead_frac > 0.05:
        parts.append(f"{dead_frac:.0%} of the latents never fired (dead; not counted as shared).")
    if not_found:
        parts.append("Looked for and not found: " + "; ".join(not_found) + ".")
    beats = kl is not None and kl["top_chat_first9"] is not None and kl["random_first9"] is not None \
        and kl["top_chat_first9"] > kl["random_first9"]
    return {"text": " ".join(parts), "found": bool(n_co or beats or tracks or steers), "chat_only": n_co,
            "top_chat": {"n": len(top), "rule": RULE, "delta_norm_range": [lo, hi], "latents": named},
            "kl": kl, "tracks": tracks, "steers": steers, "scales_warning": warn, "dead_fraction": dead_frac,
            "not_found": not_found}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.2f}"
