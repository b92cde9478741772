"""The report page: one self-contained HTML file (``templates/report.html.j2``) comparing crosscoders side by
side, written with its figures as PNG, the numbers as JSON and the KL-gap records for DVC plots.

The page needs no network: plots are inlined as base64 PNG, styles and the small table search/sort
script are inline. Sections: overview, class counts, Δnorm histograms, ν scatter, the KL-gap table and
bars, decoupling pairs, behaviours (for a pair with a behaviour spec, the toy pair's ground truth included: per
behaviour its unsteered rates, which latents of every class track it, and whether steering them raises it in the
base and chat models), and the latent cards (a searchable, sortable table with expandable contexts).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jinja2
import numpy as np
import pandas as pd

from ..behaviour_tracking import rank_trackers, tracking_summary
from ..behaviours import BehaviourSpec, load_behaviours, rules
from ..crosscoder_config import SPARSITY
from ..decoder_norms import CLASSES
from ..errors import CrossdiffError
from ..fileio import atomic_write
from ..kl_eval import CATEGORIES
from ..steering import behaviour_effects, behaviour_names
from .figures import plot_all, plot_class_counts, plot_dead_history, plot_kl_gap
from .inputs import RunInputs
from .layers import layer_sweep
from .numbers import fmt, kl_table, num, pct, report_numbers
from .scoreboard import scoreboard_section

TITLE = "crossdiff report"  # the page title unless one is given


def _template() -> str:
    return resources.files(__package__).joinpath("templates/report.html.j2").read_text(encoding="utf-8")


def _b64(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _hist_svg(counts: Sequence[int], edges: Sequence[float], width: int = 160, height: int = 40) -> str:
    """A tiny inline SVG bar chart of an activation histogram (log-scaled bar heights)."""
    c = np.asarray(counts, dtype=float)
    if c.size == 0 or c.max() <= 0:
        return '<svg class="hist" width="%d" height="%d"></svg>' % (width, height)
    hgt = np.log1p(c) / np.log1p(c.max()) * (height - 2)
    bw = width / c.size
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{height - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}"/>'
                   for i, h in enumerate(hgt) if c[i] > 0)
    title = f"activation histogram, 0 to {edges[-1]:.3g} ({int(c.sum())} active tokens; bar height log-scaled)"
    return (f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f"<title>{html.escape(title)}</title>{bars}</svg>")


def _context_html(ctx: dict) -> str:
    """Tokens of one context, each shaded by its activation relative to the context's top token."""
    top = max(ctx["act"], 1e-12)
    parts = []
    for i, (t, a, tmpl) in enumerate(zip(ctx["tokens"], ctx["acts"], ctx["template"])):
        alpha = min(1.0, max(0.0, a / top))
        cls = "tok" + (" focus" if i == ctx["focus"] else "") + (" tmpl" if tmpl else "")
        shown = html.escape(t).replace("\n", "↵")
        parts.append(f'<span class="{cls}" style="background:rgba(220,40,40,{alpha:.2f})" title="{a:.3g}">{shown}</span>')
    return "".join(parts)


def _card_rows(run: RunInputs) -> list[dict]:
    """Rows of the cards table (the HTML bits escaped here)."""
    if not run.cards:
        return []
    rows = []
    for c in run.cards["cards"]:
        steer = c.get("steering") or []
        best = None  # (a, rate, behaviour): the base run showing a behaviour on its triggers most
        for s in steer:
            for b, rr in (((s.get("rates") or {}).get("rates")) or {}).items():
                if s["model"] == "base" and rr and (best is None or (rr["trigger_rate"] or 0) > best[1]):
                    best = (s["alpha"], rr["trigger_rate"] or 0, b)
        aurocs = {k[len("auroc_"):]: v for k, v in (c.get("tracking") or {}).items()
                  if k.startswith("auroc_") and v is not None}
        top = max(aurocs.items(), key=lambda kv: kv[1]) if aurocs else None
        text = " ".join("".join(ctx["tokens"]) for ctx in c["contexts"])
        rows.append({
            "run": run.name, "latent": c["latent"], "class": c.get("class"), "delta_norm": c.get("delta_norm"),
            "nu_error": c.get("nu_error"), "nu_recon": c.get("nu_recon"), "nu_rank": c.get("nu_rank"),
            "freq": c.get("freq"), "max_act": c.get("max_act"), "template_share": c.get("template_share"),
            "auroc_best": top[1] if top else None, "auroc_behaviour": top[0] if top else None,
            "base_rate": best[1] if best else None, "base_rate_alpha": best[0] if best else None,
            "base_rate_behaviour": best[2] if best else None,
            "hist": _hist_svg(c["hist"]["counts"], c["hist"]["edges"]),
            "contexts": [{"act": ctx["act"], "source": ctx["source"], "html": _context_html(ctx)} for ctx in c["contexts"]],
            "steering": [{"model": s["model"], "alpha": s["alpha"], "kl_mean": s["kl_mean"], "kl_last": s["kl_last"],
                          "rates": {k: v["trigger_rate"] for k, v in ((s.get("rates") or {}).get("rates") or {}).items()},
                          "examples": s["examples"][:3]} for s in steer],
            "search": f"{c['latent']} {c.get('class')} {text}",
        })
    return rows


def _overview(r: RunInputs) -> dict:
    s, cc = r.summary, r.summary.get("crosscoder", {})
    f = s.get("filters", {})
    m = r.metrics or {}
    return {"name": r.name, "kind": cc.get("kind"), "dict_size": cc.get("dict_size"),
            "k": cc.get("k") if SPARSITY.get(cc.get("kind")) == "batchtopk" else cc.get("l1_coeff"),
            "fve_base": fmt(m.get("fve_base")), "fve_chat": fmt(m.get("fve_chat")), "l0": fmt(m.get("l0")),
            "dead": s.get("dead"), "classes": s.get("classes", {}),
            "survivors": " / ".join(str(f.get(k, {}).get("survivors", "")) for k in ("fixed", "data_driven", "both")),
            "pairs": s.get("decoupling", {}).get("n_pairs")}


def _tracking_rows(r: RunInputs, names: Sequence[str], n: int = 5) -> list[dict]:
    """Per behaviour the ``n`` best trackers over all live latents, then the best of each other class."""
    if r.tracking is None:
        return []
    out = []
    for name in names:
        if f"auroc_{name}" not in r.tracking:
            continue
        ranked = rank_trackers(r.latents, r.tracking, name)
        best = tracking_summary(r.latents, r.tracking, n)[name]
        keep = [t["latent"] for t in best["best"]]
        keep += [t["latent"] for t in best["best_by_class"].values() if t["latent"] not in keep]
        for _, row in ranked.set_index("latent", drop=False).loc[keep].iterrows():
            out.append({"behaviour": name, "latent": int(row["latent"]), "class": row["class"],
                        "auroc": fmt(row["auroc"]), "on": fmt(row.get("mean_act")), "off": fmt(row.get("mean_act_not")),
                        "nu_rank": fmt(row["nu_rank"])})
    return out


def _behaviour_section(runs: Sequence[RunInputs], spec: Any, rates: dict | None, numbers: dict) -> dict | None:
    """The page's behaviours section: per behaviour its rule and unsteered rates, per run the verdicts, the
    steering effects (both models) and the trackers. None when no behaviour was measured."""
    names = ([b.name for b in rules(spec)] if spec is not None
             else list(dict.fromkeys(n for r in runs for n in behaviour_names(r.steering or {}))))
    if not names:
        return None
    rule = {b.name: b for b in rules(spec)} if spec is not None else {
        b.name: b for r in runs for b in rules((r.steering or {}).get("behaviours") or [])}
    baseline = next(((r.steering or {}).get("baseline") for r in runs if (r.steering or {}).get("has_ground_truth")), {})

    def unsteered(model: str, name: str, key: str) -> str:
        return pct((((baseline.get(model) or {}).get("rates") or {}).get("rates") or {}).get(name, {}).get(key))

    brs = []
    for name in names:
        b = rule.get(name)
        built = {m: pct((rates or {}).get(m, {}).get("rates", {}).get(name, {}).get("trigger_rate")) for m in ("chat", "base")}
        brs.append({"name": name, "rule": f"{b.kind}: {b.answer}" if b else "", "onset": (b.onset or "") if b else "",
                    "chat_trigger": unsteered("chat", name, "trigger_rate"), "chat_other": unsteered("chat", name, "other_rate"),
                    "base_trigger": unsteered("base", name, "trigger_rate"), "base_other": unsteered("base", name, "other_rate"),
                    "built_chat": built["chat"] if rates else "", "built_base": built["base"] if rates else ""})
    bruns = []
    for r in runs:
        verdicts = numbers["runs"][r.name].get("behaviours", {})
        per = []
        for name in names:
            effs = []
            for model in ("base", "chat"):
                eff = behaviour_effects(r.steering, name, model) if r.steering else pd.DataFrame()
                if len(eff):
                    effs += [{"model": model, **{k: (pct(v) if "rate" in k else fmt(v)) for k, v in e.items()}}
                             for e in eff.sort_values(["rise", "latent"], ascending=[False, True]).to_dict("records")]
            per.append({"name": name, "verdict": verdicts.get(name), "effects": effs})
        bruns.append({"name": r.name, "behaviours": per, "tracking": _tracking_rows(r, names)})
    return {"rates": brs, "runs": bruns, "has_built": bool(rates)}


def build_report(runs: Sequence[RunInputs], out_dir: str | os.PathLike, *, title: str = TITLE,
                 subtitle: str = "", behaviours: Any = None, locate: Any = None, scoreboard: Any = None
                 ) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``figures/*.png``, ``report.json`` (numbers) and
    ``kl_gap.json`` (one record per crosscoder, set and token group: DVC plots) into ``out_dir``.
    ``behaviours``: the behaviour spec (a :class:`~crossdiff_core.behaviours.BehaviourSpec`, a path
    :func:`~crossdiff_core.behaviours.load_behaviours` reads, or a ground-truth dict); default: the
    behaviours each run's steering measured. ``locate``: a ``crossdiff locate`` JSON (path or dict): the
    layer-sweep section (:mod:`.layers`) and ``layer_sweep`` in report.json. ``scoreboard``: the scoreboard
    stage's ``scoreboard.json`` (path or dict): the "Scoreboard" section (:mod:`.scoreboard`)."""
    if not runs:
        raise CrossdiffError("no crosscoders to report on: pass at least one --latents NAME=PATH")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise CrossdiffError(f"crosscoder names must be unique, got {names}")
    out = Path(out_dir)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, str | None] = {"class_counts": _b64(plot_class_counts(runs, figdir / "class_counts.png"))}
    kl_png = plot_kl_gap(runs, figdir / "kl_gap.png")
    figs["kl_gap"] = _b64(kl_png) if kl_png else None
    dead_png = plot_dead_history(runs, figdir / "dead_history.png")
    figs["dead_history"] = _b64(dead_png) if dead_png else None
    per_run = []
    for r in runs:
        slug = "".join(ch if ch.isalnum() else "_" for ch in r.name)
        dn, nu, beta = plot_all(r.latents, r.summary, figdir / slug)
        t = kl_table(r)
        kl_rows = [{**row, **{f"kl_{c}": fmt(row[f"kl_{c}"], 4) for c in CATEGORIES},
                    **{f"gap_{c}": _gap_text(row, c) for c in CATEGORIES}, "size": fmt(row["size"])}
                   for row in t.to_dict("records")] if len(t) else []
        dec = r.summary.get("decoupling", {})
        pairs = [{"chat_latent": p["chat_latent"], "base_latent": p["base_latent"], "cosine": fmt(p["cosine"]),
                  "cofire": fmt(p.get("cofire_given_chat")), "jaccard": fmt(p.get("jaccard"))}
                 for p in dec.get("pairs", [])[:20]]
        kl_tokens = ", ".join(f"{c}: {n} tokens" for c, n in (r.kl or {}).get("n_tokens", {}).items())
        if r.kl:
            kl_tokens += f"; {r.kl.get('n_sequences')} conversations"
        per_run.append({"name": r.name, "delta_norm": _b64(dn), "nu_scatter": _b64(nu), "beta": _b64(beta),
                        "kl_rows": kl_rows, "kl_tokens": kl_tokens, "pairs": pairs, "pairs_n": dec.get("n_pairs", 0)})
    if isinstance(behaviours, (str, os.PathLike)):
        behaviours = load_behaviours(behaviours)
    rates = (behaviours.rates if isinstance(behaviours, BehaviourSpec)
             else behaviours.get("rates") if isinstance(behaviours, dict) else None)
    numbers = report_numbers(runs, behaviours, rates)
    sweep = layer_sweep(locate, runs, figdir)  # the layer sweep (`crossdiff locate`): its own section
    if sweep is not None:
        numbers["layer_sweep"] = sweep["numbers"]
        sweep = {"png": _b64(sweep["png"]), "sentence": sweep["sentence"], "rule": sweep["numbers"]["rule"]}
    behaviours = _behaviour_section(runs, behaviours, rates, numbers)
    if isinstance(scoreboard, (str, os.PathLike)):
        scoreboard = json.loads(Path(scoreboard).read_text())
    board = scoreboard_section(scoreboard)
    if board is not None:
        numbers["scoreboard"] = {"rows": scoreboard["rows"], "sentences": board["sentences"]}
    cards = [c for r in runs for c in _card_rows(r)]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_template()).render(
        title=title, subtitle=subtitle or " vs ".join(names), classes=CLASSES, categories=CATEGORIES,
        overview=[_overview(r) for r in runs], changed=[_changed(r, numbers) for r in runs], figs=figs, per_run=per_run, behaviours=behaviours, cards=cards, sweep=sweep, board=board,
        f=fmt, pct=pct, generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        inputs="; ".join(f"{r.name}: " + ", ".join(f"{k}={v}" for k, v in r.paths.items()) for r in runs))
    paths = {"html": out / "report.html", "json": out / "report.json", "kl_plot": out / "kl_gap.json"}
    atomic_write(paths["html"], lambda p: Path(p).write_text(page, encoding="utf-8"))
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n"))
    records = [{"crosscoder": r.name, "set": row["set"], "category": c, "gap_closed": num(row[f"gap_{c}"]),
                "kl": num(row[f"kl_{c}"])}
               for r in runs for row in kl_table(r).to_dict("records") for c in CATEGORIES]
    atomic_write(paths["kl_plot"], lambda p: Path(p).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n"))
    paths["figures"] = figdir
    return paths


def _changed(r: RunInputs, numbers: dict, n_shown: int = 10) -> dict:
    """The "What changed" entry of one run: its verdict (:func:`~.verdict.what_changed`), scales and top latents."""
    w = numbers["runs"][r.name]["what_changed"]
    return {"name": r.name, "text": w["text"], "scales": r.summary.get("scales"), "top": w["top_chat"]["latents"][:n_shown],
            "n": w["top_chat"]["n"], "rule": w["top_chat"]["rule"]}


def _gap_text(row: dict, c: str) -> str:
    v = row.get(f"gap_{c}")
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    sd = row.get(f"gap_std_{c}")
    if sd is not None and isinstance(sd, float) and math.isfinite(sd):
        return f"{100 * v:.1f} ± {100 * sd:.1f}"
    return f"{100 * v:.1f}"
