"""The report's numbers (``report.json``) and the prose verdicts on the behaviours of the pair's behaviour spec
(:mod:`crossdiff_core.behaviours`; the toy pair's ground truth is one): for each behaviour, which latents track
it and whether steering them makes the base model show it, or the chat model show it where it should not
(:func:`behaviour_verdict`). Also the formatting the page shares with the verdicts."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..decoder_norms import CHAT_ONLY
from ..behaviour_tracking import tracking_summary
from ..behaviours import rules
from ..fileio import json_safe
from ..kl_eval import CATEGORIES
from ..steering import behaviour_effects, behaviour_names, raising_runs
from .inputs import RunInputs
from .verdict import what_changed


def num(v: Any, digits: int = 6) -> Any:
    """``v`` as report.json holds it: plain Python types, floats rounded to ``digits``, non-finite -> None."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return round(float(v), digits) if math.isfinite(float(v)) else None
    return v


def fmt(v: Any, digits: int = 3) -> str:
    """``v`` as the page shows it: ``digits`` significant digits; None and non-finite -> ``""``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v)  # the template escapes it


def kl_table(run: RunInputs) -> pd.DataFrame:
    """One row per patch set (random sets folded into ``random`` mean ± std): KL and % of gap closed per
    token group."""
    if not run.kl:
        return pd.DataFrame()
    rows = []
    for s in run.kl["sets"]:
        if s["group"]:
            continue
        rows.append({"set": s["name"], "size": s["size"], "description": s["description"],
                     **{f"kl_{c}": s["kl"][c] for c in CATEGORIES}, **{f"gap_{c}": s["gap_closed"][c] for c in CATEGORIES}})
    for g, st in run.kl.get("groups", {}).items():
        what = "live" if g == "top_chat_random" else "chat-only"  # the baseline of top_chat, else of the chat-only sets
        rows.append({"set": g, "size": st["size"], "description": f"{st['n_sets']} random sets of {st['size']} {what} latents (mean ± std)",
                     **{f"kl_{c}": st["kl_mean"][c] for c in CATEGORIES}, **{f"gap_{c}": st["gap_closed_mean"][c] for c in CATEGORIES},
                     **{f"kl_std_{c}": st["kl_std"][c] for c in CATEGORIES},
                     **{f"gap_std_{c}": st["gap_closed_std"][c] for c in CATEGORIES}})
    return pd.DataFrame(rows)


def _onset_label(behaviour: str, behaviours: Any) -> str:
    """How the texts name a behaviour's opening word: quoted from the spec, else "its opening"."""
    b = next((b for b in (rules(behaviours) if behaviours else ()) if b.name == behaviour), None)
    return f"“{b.onset}”" if b is not None and b.onset else "its opening"


def _tracking(run: RunInputs, behaviour: str) -> dict | None:
    """The run's best trackers of ``behaviour`` over all live latents, and the best of each class."""
    if run.tracking is not None and f"auroc_{behaviour}" in run.tracking:
        return tracking_summary(run.latents, run.tracking).get(behaviour)
    return ((run.steering or {}).get("tracking") or {}).get(behaviour)


def _tracking_text(tr: dict | None, behaviour: str) -> str:
    if not tr or not tr.get("best"):
        return ""
    best = ", ".join(f"{t['latent']} ({t['class'].replace('_', '-')}, {t['auroc']:.2f})" for t in tr["best"])
    co = tr["best_by_class"].get(CHAT_ONLY)
    co_text = (f"the best chat-only tracker is latent {co['latent']} ({co['auroc']:.2f})" if co
               else "no chat-only latent tracks it")
    return (f"Latents that track {behaviour} best (AUROC of the prompt's largest activation, trigger prompts vs "
            f"the rest): {best}; {co_text}. ")


def _base_verdict(run: RunInputs, behaviour: str, word: str) -> dict | None:
    """The base-model part of :func:`behaviour_verdict`; ``word`` names the behaviour's opening word."""
    if not run.steering or not run.steering.get("has_ground_truth"):
        return None
    eff = behaviour_effects(run.steering, behaviour, "base")
    if eff.empty:
        return None
    co = eff[eff["class"] == CHAT_ONLY]
    tried = {"latents": sorted(int(j) for j in co["latent"].unique()),
             "alphas": sorted(float(a) for a in co["alpha"].unique()),
             "n_trigger": int(co["n_trigger"].max()) if len(co) else 0}
    tried_text = (f"Tried {len(tried['latents'])} chat-only latents ({', '.join(map(str, tried['latents']))}) at "
                  f"a ∈ {{{', '.join(f'{a:g}' for a in tried['alphas'])}}} on {tried['n_trigger']} trigger prompts.")
    unsteered = pct(eff["trigger_rate_unsteered"].iloc[0])
    if co.empty:
        n_co = int(((run.latents["class"] == CHAT_ONLY) & np.isfinite(run.latents["max_act"].astype(float))).sum())
        text = (f"No chat-only latent was steered ({n_co} chat-only latents fire in this crosscoder), so none can be "
                f"named: the base model's {behaviour} rate was {unsteered} unsteered; "
                f"latents steered: {', '.join(map(str, sorted(eff['latent'].unique())))} (not chat-only).")
        return {"found": False, "best": None, "tried": tried, "text": text}
    up = raising_runs(co, "rise", "other_rate")
    if len(up):
        b = up.iloc[0].to_dict()
        text = (f"Steering the base model with chat-only latent {int(b['latent'])}{_nu_note(run, int(b['latent']))} "
                f"(a = {b['alpha']:g}) raises its {behaviour} rate on trigger prompts from "
                f"{pct(b['trigger_rate_unsteered'])} to {pct(b['trigger_rate'])} (other prompts: "
                f"{pct(b['other_rate_unsteered'])} → {pct(b['other_rate'])}; {b['n_trigger']} trigger prompts). "
                f"{up['latent'].nunique()} of {len(tried['latents'])} chat-only latents tried raise it at some a.")
        return {"found": "full", "best": _clean(b), "raising": _clean_records(up), "tried": tried, "text": text}
    on = raising_runs(co, "onset_rise", "onset_other_rate")
    if len(on):
        b = on.iloc[0].to_dict()
        text = (f"No chat-only latent made the base model give the whole {behaviour} (its rate stayed at "
                f"{unsteered}), but chat-only latent {int(b['latent'])}{_nu_note(run, int(b['latent']))} "
                f"at a = {b['alpha']:g} makes it open its answers with {word} on {pct(b['onset_trigger_rate'])} of "
                f"the trigger prompts (unsteered {pct(b['onset_trigger_rate_unsteered'])}; other prompts: "
                f"{pct(b['onset_other_rate_unsteered'])} → {pct(b['onset_other_rate'])}): it drives the {behaviour}'s "
                f"onset. Steering adds the vector at every position, so the answer tends to repeat the opening word "
                f"rather than finish the sentence. {on['latent'].nunique()} of {len(tried['latents'])} chat-only latents "
                f"tried do this at some a. " + tried_text)
        return {"found": "onset", "best": _clean(b), "raising": _clean_records(on), "tried": tried, "text": text}
    # nothing rose: no run is named "best" (a flat run would read as a finding)
    text = (f"No chat-specific latent raised the base model's {behaviour} rate, nor the rate of answers opening "
            f"with {word}. " + tried_text + f" The base model's {behaviour} rate stayed at {unsteered}.")
    return {"found": False, "best": None, "tried": tried, "text": text}


def _chat_evidence(run: RunInputs, behaviour: str, word: str) -> str:
    """A sentence on what steering chat-only latents does in the chat model (which already shows the
    behaviour on its triggers): the largest rise of the behaviour, or of its onset, on the other prompts."""
    eff = behaviour_effects(run.steering, behaviour, "chat")
    co = eff[eff["class"] == CHAT_ONLY] if len(eff) else eff
    if co.empty:
        return _other_classes(eff, behaviour, "chat", word)
    for col, rate, what in (("other_rise", "other_rate", f"the whole {behaviour}"),
                            ("onset_other_rise", "onset_other_rate", f"answers opening with {word}")):
        up = raising_runs(co, col)
        if len(up):
            b = up.iloc[0].to_dict()
            return (f" In the chat model, chat-only latent {int(b['latent'])}{_nu_note(run, int(b['latent']))} at "
                    f"a = {b['alpha']:g} raises {what} on prompts that do not trigger it from "
                    f"{pct(b[rate + '_unsteered'])} to {pct(b[rate])} ({_count(up['latent'].nunique(), 'chat-only latent')} "
                    f"of those tried raise{'s' if up['latent'].nunique() == 1 else ''} it at some a)."
                    + _other_classes(eff, behaviour, "chat", word))
    return (f" In the chat model, no chat-only latent tried raised the {behaviour} or its onset on other prompts."
            + _other_classes(eff, behaviour, "chat", word))


def _other_classes(eff: pd.DataFrame, behaviour: str, model: str, word: str) -> str:
    """A sentence on the steered latents of the other classes (the best trackers among them): the largest
    rise of the behaviour (else its onset) they bring about in ``model``; empty when none was steered."""
    rest = eff[eff["class"] != CHAT_ONLY] if len(eff) else eff
    if rest.empty:
        return ""
    where = "on its trigger prompts" if model == "base" else "on prompts that do not trigger it"
    side = "" if model == "base" else "other_"
    rate = "trigger_rate" if model == "base" else "other_rate"
    for col, r, what in ((f"{side}rise", rate, behaviour), (f"onset_{side}rise", f"onset_{rate}", f"answers opening with {word}")):
        up = raising_runs(rest, col)
        if len(up):
            b = up.iloc[0].to_dict()
            return (f" Of the other latents steered, {str(b['class']).replace('_', '-')} latent {int(b['latent'])} at "
                    f"a = {b['alpha']:g} raises {what} in the {model} model {where} from {pct(b[r + '_unsteered'])} to "
                    f"{pct(b[r])}.")
    n = rest["latent"].nunique()
    return f" None of the {_count(n, 'other latent')} steered ({', '.join(sorted(set(map(str, rest['class']))))}) raised it in the {model} model either."


def behaviour_verdict(run: RunInputs, behaviour: str, behaviours: Any = None) -> dict | None:
    """For one behaviour: which latents track it (AUROC over all live latents, every class), and whether
    steering a chat-only latent makes the base model show it on its trigger prompts: the full behaviour
    (``found = "full"``), else its onset, answers that open with its first word (``found = "onset"``), else
    neither (``found = False``); the text adds what the other classes' steered latents (the best trackers)
    do, and what the same latents do in the chat model on the prompts that do not trigger it.
    ``behaviours``: the spec (for the onset word; default the steering result's record). Returns
    ``{"behaviour", "found", "best" (the base run with the largest rise; None when nothing rose), "tried":
    {latents, alphas, n_trigger}, "tracking", "text"}``; None without steering results with behaviour rates."""
    word = _onset_label(behaviour, behaviours or (run.steering or {}).get("behaviours"))
    v = _base_verdict(run, behaviour, word)
    if v is None:
        return None
    tr = _tracking(run, behaviour)
    eff = behaviour_effects(run.steering, behaviour, "base")
    v["text"] = (_tracking_text(tr, behaviour) + v["text"] + _other_classes(eff, behaviour, "base", word)
                 + _chat_evidence(run, behaviour, word))
    return {"behaviour": behaviour, **v, "tracking": tr}


def behaviour_verdicts(run: RunInputs, behaviours: Any = None) -> dict[str, dict]:
    """:func:`behaviour_verdict` for every behaviour of the spec (default: those the steering measured)."""
    names = [b.name for b in rules(behaviours)] if behaviours else behaviour_names(run.steering or {})
    out = {}
    for name in names:
        v = behaviour_verdict(run, name, behaviours)
        if v is not None:
            out[name] = v
    return out


def _nu_note(run: RunInputs, latent: int) -> str:
    """`` (ν_ε = …, ν_r = …; passes the fixed ν filter)`` for a latent, from the run's table and summary."""
    row = run.latents.set_index("latent").loc[latent] if latent in set(run.latents["latent"]) else None
    if row is None:
        return ""
    passed = [name for name in ("fixed", "data_driven")
              if latent in set(run.summary.get("filters", {}).get(name, {}).get("latents", []))]
    verdict = ("passes the " + " and ".join(p.replace("_", "-") for p in passed) + " ν filter" + ("s" if len(passed) > 1 else "")
               if passed else "fails the ν filters")
    return f" (ν_ε = {fmt(row['nu_error'], 2)}, ν_r = {fmt(row['nu_recon'], 2)}; {verdict})"


def _clean(d: dict | None) -> dict | None:
    return None if d is None else {k: num(v) for k, v in d.items()}


def _clean_records(df: pd.DataFrame) -> list[dict]:
    return [_clean(r) for r in df.to_dict("records")]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def pct(v: Any) -> str:
    """A rate in [0, 1] as a whole percentage; None and non-finite -> ``"n/a"``."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * float(v):.0f}%"


def report_numbers(runs: Sequence[RunInputs], behaviours: Any = None, rates: dict | None = None) -> dict:
    """The report's numbers (``report.json``; flat keys suit ``dvc metrics show``). ``behaviours``: the spec
    (default: what each run's steering measured); ``rates``: rates measured when the pair was built (the toy
    pair's), kept as ``behaviour_rates``."""
    out: dict[str, Any] = {"runs": {}}
    for r in runs:
        s = r.summary
        d: dict[str, Any] = {
            "kind": s.get("crosscoder", {}).get("kind"), "dict_size": s.get("crosscoder", {}).get("dict_size"),
            "classes": s.get("classes"), "dead": s.get("dead"),
            "chat_only_survivors": {k: v["survivors"] for k, v in s.get("filters", {}).items()},
            "decoupling_pairs": s.get("decoupling", {}).get("n_pairs"),
        }
        if r.metrics:
            d["training"] = {k: num(r.metrics.get(k)) for k in ("fve_base", "fve_chat", "l0", "dead_fraction", "mse")
                             if k in r.metrics}
        t = kl_table(r)
        if len(t):
            d["kl_gap_closed"] = {row["set"]: {c: num(row[f"gap_{c}"]) for c in CATEGORIES} for _, row in t.iterrows()}
            d["kl"] = {row["set"]: {c: num(row[f"kl_{c}"]) for c in CATEGORIES} for _, row in t.iterrows()}
        v = behaviour_verdicts(r, behaviours)
        if v:
            d["behaviours"] = v
        d["what_changed"] = json_safe(what_changed(r))  # the run's overall verdict (apart from the behaviours')
        if s.get("scales"):
            d["scales"] = s["scales"]
        if r.steering and r.steering.get("has_ground_truth"):
            d["behaviour_rates_unsteered"] = {m: (b.get("rates") or {}).get("rates")
                                              for m, b in r.steering.get("baseline", {}).items()}
        out["runs"][r.name] = d
    if rates is not None:
        out["behaviour_rates"] = rates
    return out
