"""Each stage's headline numbers: the few values of its product worth an MLflow metric or a line on the
terminal. They sit above the stages (the steering headline reads :func:`~crossdiff_core.steering.behaviour_effects`),
apart from :mod:`crossdiff_core.runs`, which the stages themselves open their inputs with."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .steering import behaviour_effects, behaviour_names, raising_runs


def analysis_headline(summary: dict) -> dict:
    """The analysis numbers worth a metric: class counts, dead latents, filter survivors, decoupling."""
    f = summary["filters"]
    return {"classes": summary["classes"], "dead": summary["dead"],
            "chat_only_survivors": {k: f[k]["survivors"] for k in ("fixed", "data_driven", "both")},
            "decoupling_pairs": summary["decoupling"]["n_pairs"],
            "nu_error_median": summary["chat_only"]["nu_error_median"],
            "nu_recon_median": summary["chat_only"]["nu_recon_median"]}


def kl_headline(d: dict) -> dict:
    """The numbers of a KL-gap evaluation worth a metric: per token group the mean share of the gap closed
    by each group of sets (random sets), and per other set its share."""
    out = {f"gap_closed_mean.{g}": v.get("gap_closed_mean") for g, v in d.get("groups", {}).items()}
    for r in d.get("sets", []):
        if not r.get("group") and isinstance(r.get("gap_closed"), dict):
            out.update({f"gap_closed.{r['name']}.{g}": v for g, v in r["gap_closed"].items()})
    return out


def steering_headline(res: dict) -> dict:
    """The numbers of a sweep worth a metric: how many latents were steered and, for every behaviour ``b``
    the sweep measured, how many latents raise it at some a (``base_<b>``: in the base model on its trigger
    prompts; ``chat_<b>``: in the chat model on the prompts that do not trigger it; each also for its
    onset, ``..._onset``) and the run that raises it most (latent, class, a, rates steered and unsteered);
    no "best" run where none raises it. With tracking, ``tracking_<b>``: the best tracker's latent, class
    and AUROC, and the best chat-only tracker's AUROC."""
    out: dict[str, Any] = {"latents": len(res["latents"]), "seconds": res.get("seconds")}
    for b in behaviour_names(res):
        # the base model is asked to show b where it should; the chat model, which already does, elsewhere
        for model, side, rates in (("base", "", ("trigger_rate", "other_rate")),
                                   ("chat", "other_", ("other_rate", "trigger_rate"))):
            eff = behaviour_effects(res, b, model)
            if not len(eff):
                continue
            for key, onset in ((f"{model}_{b}", ""), (f"{model}_{b}_onset", "onset_")):
                rate, other = (onset + r for r in rates)
                up = raising_runs(eff, f"{onset}{side}rise")
                out[f"{key}_raised_by"] = int(up["latent"].nunique())
                if len(up):
                    best = up.iloc[0]
                    out[f"{key}_best"] = {"latent": int(best["latent"]), "class": best["class"],
                                          "alpha": float(best["alpha"]), rate: float(best[rate]),
                                          "unsteered": float(best[f"{rate}_unsteered"]), other: float(best[other])}
        tr = (res.get("tracking") or {}).get(b)
        if tr and tr.get("best"):
            co = tr["best_by_class"].get("chat_only")
            out[f"tracking_{b}"] = {**tr["best"][0], "chat_only_auroc": co["auroc"] if co else None}
    return out
