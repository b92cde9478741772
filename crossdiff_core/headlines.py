"""Each stage's headline numbers: the few values of its product worth an MLflow metric or a line on the
terminal. They sit above the stages (the steering headline reads :func:`~crossdiff_core.steering.refusal_effects`),
apart from :mod:`crossdiff_core.runs`, which the stages themselves open their inputs with."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .steering import raising_runs, refusal_effects


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


def steering_headline(res: dict, behaviour: str = "refusal") -> dict:
    """The numbers of a sweep worth a metric: how many latents were steered and, with a ground truth, how many
    raise the base model's ``behaviour`` (whole, and its onset) on trigger prompts at some a, and the run that
    raises each most (latent, class, a, rates steered and unsteered). No "best" run when none raises it."""
    out: dict[str, Any] = {"latents": len(res["latents"]), "seconds": res.get("seconds")}
    eff = refusal_effects(res, behaviour) if res.get("has_ground_truth") else pd.DataFrame()
    if not len(eff):
        return out
    for key, rise, rate, other in ((f"base_{behaviour}", "rise", "trigger_rate", "other_rate"),
                                   (f"base_{behaviour}_onset", "onset_rise", "onset_trigger_rate", "onset_other_rate")):
        up = raising_runs(eff, rise)
        out[f"{key}_raised_by"] = int(up["latent"].nunique())
        if len(up):
            best = up.iloc[0]
            out[f"{key}_best"] = {"latent": int(best["latent"]), "class": best["class"], "alpha": float(best["alpha"]),
                                  rate: float(best[rate]), "unsteered": float(best[f"{rate}_unsteered"]),
                                  other: float(best[other])}
    return out
