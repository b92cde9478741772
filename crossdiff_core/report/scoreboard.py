"""The report's "Scoreboard" section: every method's scores (:mod:`crossdiff_core.scoreboard`) per behaviour,
a sentence per behaviour naming the method that found it best against the random floor, and what each
method says changed (its first directions' top tokens, a crosscoder's latent ids)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from .numbers import fmt, pct


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else float("nan")


def _rise(v: Mapping[str, Any], model: str) -> float:
    s = (v.get("steer") or {}).get(model)
    return _num(s["best"]) - _num(s["unsteered"]) if s else float("nan")


def behaviour_sentence(board: Mapping[str, Any], behaviour: str) -> str:
    """Which method detects ``behaviour`` best and which raises it most when steered, read against the random
    control (the floor)."""
    recs = [m for m in board["methods"] if behaviour in m["behaviours"]]
    if not recs:
        return f"{behaviour}: no method was scored."
    rnd = next((m for m in recs if m["family"] == "random"), None)
    det = max(recs, key=lambda m: (_num(m["behaviours"][behaviour]["auroc"]), m["family"] != "random"))
    a = _num(det["behaviours"][behaviour]["auroc"])
    floor = _num(rnd["behaviours"][behaviour]["auroc"]) if rnd else float("nan")
    parts = [f"{behaviour}: best detected by {det['name']} ({det['behaviours'][behaviour]['best_label']}, AUROC {fmt(a)}"
             + (f"; random directions {fmt(floor)})" if rnd else ")")]
    for model in [m for m in ("chat", "base") if any(model_in(r, behaviour, m) for r in recs)]:
        best = max(recs, key=lambda m: (_num(_rise(m["behaviours"][behaviour], model)), m["family"] != "random"))
        r = _rise(best["behaviours"][behaviour], model)
        s = best["behaviours"][behaviour]["steer"][model]
        if not (r > 0):
            parts.append(f"no method's steered directions raised it in the {model} model (unsteered {pct(_num(s['unsteered']))})")
            continue
        floor_r = _rise(rnd["behaviours"][behaviour], model) if rnd else float("nan")
        which = f"{best['name']}'s {s['best_label']}" if s.get("best_label") else f"{best['name']}'s best direction"
        parts.append(f"steering {which} raised it most in the {model} model: "
                     f"{pct(_num(s['unsteered']))} → {pct(_num(s['best']))} of all prompts at a = {fmt(s['best_alpha'])}"
                     + (f" (random: {'+' if floor_r >= 0 else ''}{pct(floor_r)})" if rnd and math.isfinite(floor_r) else ""))
    return "; ".join(parts) + "."


def model_in(rec: Mapping[str, Any], behaviour: str, model: str) -> bool:
    return model in (rec["behaviours"][behaviour].get("steer") or {})


def scoreboard_section(board: Mapping[str, Any] | None) -> dict | None:
    """The section's rows, sentences and per-method readings; None without a board."""
    if not board or not board.get("methods"):  # none made, or skipped (no behaviour spec)
        return None
    models = [m for m in ("base", "chat") if m in (board.get("config") or {}).get("models", ("base", "chat"))]
    rows = []
    for b in board["behaviours"]:
        for m in board["methods"]:
            v = m["behaviours"][b]
            steer = {model: v["steer"].get(model) for model in models}
            r = v.get("steer_scale") or {}  # boards written before the per-direction scale have none
            rows.append({"behaviour": b, "method": m["name"], "family": m["family"], "best": v["best_label"],
                         "auroc": fmt(v["auroc"]) + ("*" if m.get("supervised") else ""),
                         **{f"steer_{model}": (f"{pct(_num(s['unsteered']))} → {pct(_num(s['best']))} (a={fmt(s['best_alpha'])}"
                                               + (f" × {_num(r[model]):.3g}" if model in r else "")
                                               + (f", {s['best_label']}" if s.get("best_label") not in (None, v["best_label"])
                                                  else "") + ")"
                                               if s else "") for model, s in steer.items()},
                         "gap_first9": pct(_num(m["gap_closed"]["first9"])),
                         "gap_response": pct(_num(m["gap_closed"]["response"]))})
    methods = []
    for m in board["methods"]:
        toks = [{"label": t["label"], "tokens": " ".join(repr(x["token"]) for x in t["top"][:6])} for t in m.get("top_tokens", [])]
        methods.append({"name": m["name"], "description": m["description"], "labels": ", ".join(m["labels"]),
                        "latents": m.get("latents"), "tokens": toks})
    cfg = board.get("config") or {}
    unit = board.get("steer_unit", "norm")  # boards written before the setting steered by the mean norm
    if unit == "peak":
        scale = ("direction's reach: how far the chat model's strongest prompt token goes along it above the mean "
                 "token (in the base model times the ratio of the two models' spreads; the × figure in each cell)")
    else:
        scale = ("model's spread of its block activations (RMS distance of a token's from the mean)" if unit == "spread"
                 else "model's mean block norm")
        r = board.get("steer_norms") or {}
        scale += " (" + ", ".join(f"{k} {v:.3g}" for k, v in r.items()) + ")" if r else ""
    protocol = (f"Each method proposes its top {board['n_directions']} directions at block {board['layer']}. Detection: AUROC of "
                f"a prompt's largest projection on the chat model's activations (for a _codes method the latent's "
                f"largest code, the same latents as its ranking's row; trigger prompts vs the rest, "
                f"{board['n_prompts']} prompts), best of the N"
                + ("; * a _track method, the one that picks its latents with the behaviour labels (the best trackers "
                   "of each behaviour in turn): its AUROC is cross-fitted, the best tracker of one half of the prompts "
                   "scored on the other, both ways" if any(m.get("supervised") for m in board["methods"]) else "")
                + f". Steering: the {cfg.get('steer_top', 1)} best-detecting direction(s) per method, each scaled to a × the "
                f"{scale} (a in {cfg.get('alphas')}), the behaviour's rate over all prompts at the best direction and a "
                f"(named in the cell when it is not the detection-best). "
                f"KL gap: the share closed when the chat model's block output is replaced by h_b + P(h_c − h_b), P "
                f"the projection onto the span of the N directions ({board.get('kl_tokens', {}).get('response', 0)} "
                f"answer tokens of {board.get('kl_sequences', 0)} held-out conversations).")
    return {"rows": rows, "models": models, "sentences": [behaviour_sentence(board, b) for b in board["behaviours"]],
            "methods": methods, "protocol": protocol}
