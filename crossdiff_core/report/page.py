"""The report page: one self-contained HTML file (``templates/report.html.j2``) comparing crosscoders side by
side, written with its figures as PNG, the numbers as JSON and the KL-gap records for DVC plots.

The page needs no network: plots are inlined as base64 PNG, styles and the small table search/sort
script are inline. Sections: overview, class counts, Δnorm histograms, ν scatter, the KL-gap table and
bars, decoupling pairs, planted behaviours (for a pair with a ground truth: which latents track them and
whether steering a chat-specific latent raises the planted refusal rate in the base model), and the latent
cards (a searchable, sortable table with expandable contexts).
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
from typing import Sequence

import jinja2
import numpy as np
import pandas as pd

from ..decoder_norms import CLASSES
from ..errors import CrossdiffError
from ..fileio import atomic_write
from ..kl_eval import CATEGORIES
from ..steering import refusal_effects
from .figures import plot_all, plot_class_counts, plot_kl_gap
from .inputs import RunInputs
from .numbers import fmt, kl_table, num, pct, report_numbers

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
        best = None
        for s in steer:
            rr = ((s.get("rates") or {}).get("rates") or {}).get("refusal")
            if s["model"] == "base" and rr and (best is None or (rr["trigger_rate"] or 0) > best[1]):
                best = (s["alpha"], rr["trigger_rate"] or 0)
        text = " ".join("".join(ctx["tokens"]) for ctx in c["contexts"])
        rows.append({
            "run": run.name, "latent": c["latent"], "class": c.get("class"), "delta_norm": c.get("delta_norm"),
            "nu_error": c.get("nu_error"), "nu_recon": c.get("nu_recon"), "nu_rank": c.get("nu_rank"),
            "freq": c.get("freq"), "max_act": c.get("max_act"), "template_share": c.get("template_share"),
            "auroc_refusal": (c.get("tracking") or {}).get("auroc_refusal"),
            "base_refusal": best[1] if best else None, "base_refusal_alpha": best[0] if best else None,
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
            "k": cc.get("k") if cc.get("kind") == "batchtopk" else cc.get("l1_coeff"),
            "fve_base": fmt(m.get("fve_base")), "fve_chat": fmt(m.get("fve_chat")), "l0": fmt(m.get("l0")),
            "dead": s.get("dead"), "classes": s.get("classes", {}),
            "survivors": " / ".join(str(f.get(k, {}).get("survivors", "")) for k in ("fixed", "data_driven", "both")),
            "pairs": s.get("decoupling", {}).get("n_pairs")}


def _tracking_rows(r: RunInputs, ground_truth: dict, n: int = 5) -> list[dict]:
    if r.tracking is None:
        return []
    t = r.tracking.merge(r.latents[["latent", "class", "nu_rank"]], on="latent", how="left")
    out = []
    for b in ground_truth["behaviours"]:
        col = f"auroc_{b['name']}"
        if col not in t:
            continue
        top = t.sort_values([col, "latent"], ascending=[False, True], na_position="last").head(n)
        for _, row in top.iterrows():
            out.append({"behaviour": b["name"], "latent": int(row["latent"]), "class": row["class"],
                        "auroc": fmt(row[col]), "on": fmt(row[f"mean_act_{b['name']}"]),
                        "off": fmt(row[f"mean_act_not_{b['name']}"]), "nu_rank": fmt(row["nu_rank"])})
    return out


def build_report(runs: Sequence[RunInputs], out_dir: str | os.PathLike, *, title: str = TITLE,
                 subtitle: str = "", ground_truth: dict | None = None) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``figures/*.png``, ``report.json`` (numbers) and
    ``kl_gap.json`` (one record per crosscoder, set and token group: DVC plots) into ``out_dir``."""
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
    behaviours = None
    numbers = report_numbers(runs, ground_truth)
    if ground_truth is not None:
        rates = ground_truth.get("rates", {})
        brs = [{"name": b["name"],
                "chat": pct(rates.get("chat", {}).get("rates", {}).get(b["name"], {}).get("trigger_rate")),
                "base": pct(rates.get("base", {}).get("rates", {}).get(b["name"], {}).get("trigger_rate"))}
               for b in ground_truth["behaviours"]]
        bruns = []
        for r in runs:
            eff = refusal_effects(r.steering, "refusal", "base") if r.steering else pd.DataFrame()
            bruns.append({"name": r.name, "verdict": numbers["runs"][r.name].get("refusal_steering"),
                          "effects": [{k: (pct(v) if "rate" in k else fmt(v)) for k, v in e.items()}
                                      for e in eff.sort_values(["rise", "latent"], ascending=[False, True]).to_dict("records")]
                          if len(eff) else [],
                          "tracking": _tracking_rows(r, ground_truth)})
        behaviours = {"rates": brs, "runs": bruns}
    cards = [c for r in runs for c in _card_rows(r)]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_template()).render(
        title=title, subtitle=subtitle or " vs ".join(names), classes=CLASSES, categories=CATEGORIES,
        overview=[_overview(r) for r in runs], figs=figs, per_run=per_run, behaviours=behaviours, cards=cards,
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


def _gap_text(row: dict, c: str) -> str:
    v = row.get(f"gap_{c}")
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    sd = row.get(f"gap_std_{c}")
    if sd is not None and isinstance(sd, float) and math.isfinite(sd):
        return f"{100 * v:.1f} ± {100 * sd:.1f}"
    return f"{100 * v:.1f}"
