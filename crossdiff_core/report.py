"""The researcher's report: one self-contained HTML page per pipeline run comparing crosscoders (e.g. L1
and BatchTopK) side by side, plus the same figures as PNG and the numbers as JSON (DVC plots/metrics).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .fileio import atomic_write
from .decoder_norms import CHAT_ONLY, CLASSES
from .errors import CrossdiffError
from .kl_eval import CATEGORIES
from .plots import _save, plot_all
from .steering import raising_runs, refusal_effects

KL_BAR_SETS = ("chat_only", "delta_norm_top", "delta_norm_bottom", "nu_top", "nu_bottom", "random", "error",
               "reconstruction")
CATEGORY_TITLES = {"first9": "first 9 response tokens", "response": "all response tokens", "template": "template tokens"}


@dataclass
class RunInputs:
    """Everything the report shows about one crosscoder. Only ``latents`` and ``summary`` are required."""

    name: str
    latents: pd.DataFrame
    summary: dict
    kl: dict | None = None  # KLResult.to_dict()
    cards: dict | None = None  # latent_cards(...)
    steering: dict | None = None  # run_steering(...)
    tracking: pd.DataFrame | None = None  # behaviour_tracking(...)
    metrics: dict | None = None  # the crosscoder's training metrics.json
    paths: dict[str, str] = field(default_factory=dict)


def _read_json(path: str | os.PathLike | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CrossdiffError(f"{p} does not exist: run the stage that writes it, or leave the option out")
    return json.loads(p.read_text())


def load_run(name: str, latents: str | os.PathLike, *, summary: str | os.PathLike | None = None,
             kl: str | os.PathLike | None = None, cards: str | os.PathLike | None = None,
             steering: str | os.PathLike | None = None, tracking: str | os.PathLike | None = None,
             crosscoder: str | os.PathLike | None = None) -> RunInputs:
    """Read one crosscoder's artifacts. ``summary`` defaults to the analysis summary next to ``latents``;
    ``crosscoder`` (a directory) contributes its ``metrics.json`` when present."""
    from .analysis import default_summary_path

    lp = Path(latents)
    if not lp.is_file():
        raise CrossdiffError(f"{lp} does not exist: run `crossdiff analyze` first")
    sp = Path(summary) if summary else default_summary_path(lp)
    metrics = None
    if crosscoder is not None and (Path(crosscoder) / "metrics.json").is_file():
        metrics = json.loads((Path(crosscoder) / "metrics.json").read_text())
    tr = pd.read_parquet(tracking) if tracking else None
    paths = {k: str(v) for k, v in dict(latents=lp, summary=sp, kl=kl, cards=cards, steering=steering,
                                        tracking=tracking, crosscoder=crosscoder).items() if v}
    return RunInputs(name, pd.read_parquet(lp), _read_json(sp), _read_json(kl), _read_json(cards),
                     _read_json(steering), tr, metrics, paths)


# ---- numbers --------------------------------------------------------------------------------------

def _num(v: Any, digits: int = 6) -> Any:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return round(float(v), digits) if math.isfinite(float(v)) else None
    return v


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
        rows.append({"set": g, "size": st["size"], "description": f"{st['n_sets']} random sets of {st['size']} chat-only latents (mean ± std)",
                     **{f"kl_{c}": st["kl_mean"][c] for c in CATEGORIES}, **{f"gap_{c}": st["gap_closed_mean"][c] for c in CATEGORIES},
                     **{f"kl_std_{c}": st["kl_std"][c] for c in CATEGORIES},
                     **{f"gap_std_{c}": st["gap_closed_std"][c] for c in CATEGORIES}})
    return pd.DataFrame(rows)


def _onset_label(behaviour: str, ground_truth: dict | None) -> str:
    """How the texts name a behaviour's opening word: quoted from the ground truth, else "its first word"."""
    from .toy_models import onset_word

    b = next((b for b in (ground_truth or {}).get("behaviours", []) if b["name"] == behaviour), None)
    return f"“{onset_word(b)}”" if b else "its first word"


def _base_verdict(run: RunInputs, behaviour: str, word: str) -> dict | None:
    """The base-model part of :func:`behaviour_verdict`; ``word`` names the behaviour's opening word."""
    if not run.steering or not run.steering.get("has_ground_truth"):
        return None
    eff = refusal_effects(run.steering, behaviour, "base")
    if eff.empty:
        return None
    co = eff[eff["class"] == CHAT_ONLY]
    tried = {"latents": sorted(int(j) for j in co["latent"].unique()),
             "alphas": sorted(float(a) for a in co["alpha"].unique()),
             "n_trigger": int(co["n_trigger"].max()) if len(co) else 0}
    tried_text = (f"Tried {len(tried['latents'])} chat-only latents ({', '.join(map(str, tried['latents']))}) at "
                  f"a ∈ {{{', '.join(f'{a:g}' for a in tried['alphas'])}}} on {tried['n_trigger']} trigger prompts.")
    unsteered = _pct(eff["trigger_rate_unsteered"].iloc[0])
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
                f"{_pct(b['trigger_rate_unsteered'])} to {_pct(b['trigger_rate'])} (other prompts: "
                f"{_pct(b['other_rate_unsteered'])} → {_pct(b['other_rate'])}; {b['n_trigger']} trigger prompts). "
                f"{up['latent'].nunique()} of {len(tried['latents'])} chat-only latents tried raise it at some a.")
        return {"found": "full", "best": _clean(b), "raising": _clean_records(up), "tried": tried, "text": text}
    on = raising_runs(co, "onset_rise", "onset_other_rate")
    if len(on):
        b = on.iloc[0].to_dict()
        text = (f"No chat-only latent made the base model give the whole {behaviour} (its rate stayed at "
                f"{unsteered}), but chat-only latent {int(b['latent'])}{_nu_note(run, int(b['latent']))} "
                f"at a = {b['alpha']:g} makes it open its answers with {word} on {_pct(b['onset_trigger_rate'])} of "
                f"the trigger prompts (unsteered {_pct(b['onset_trigger_rate_unsteered'])}; other prompts: "
                f"{_pct(b['onset_other_rate_unsteered'])} → {_pct(b['onset_other_rate'])}): it drives the {behaviour}'s "
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
    eff = refusal_effects(run.steering, behaviour, "chat")
    co = eff[eff["class"] == CHAT_ONLY] if len(eff) else eff
    if co.empty:
        return ""
    for col, rate, what in (("other_rise", "other_rate", f"the whole {behaviour}"),
                            ("onset_other_rise", "onset_other_rate", f"answers opening with {word}")):
        up = raising_runs(co, col)
        if len(up):
            b = up.iloc[0].to_dict()
            return (f" In the chat model, chat-only latent {int(b['latent'])}{_nu_note(run, int(b['latent']))} at "
                    f"a = {b['alpha']:g} raises {what} on prompts that do not trigger it from "
                    f"{_pct(b[rate + '_unsteered'])} to {_pct(b[rate])} ({_count(up['latent'].nunique(), 'chat-only latent')} "
                    f"of those tried raise{'s' if up['latent'].nunique() == 1 else ''} it at some a).")
    return f" In the chat model, no chat-only latent tried raised the {behaviour} or its onset on other prompts."


def behaviour_verdict(run: RunInputs, behaviour: str = "refusal", ground_truth: dict | None = None) -> dict | None:
    """Whether steering a chat-only latent makes the base model show ``behaviour`` on its trigger prompts:
    the full behaviour (``found = "full"``), else its onset, answers that open with its first word
    (``found = "onset"``), else neither (``found = False``); the text adds what the same latents do in
    the chat model on the prompts that do not trigger the behaviour. Returns ``{"found", "best" (the base
    run with the largest rise; None when nothing rose), "tried": {latents, alphas, n_trigger}, "text"}``;
    None without steering results with a ground truth."""
    word = _onset_label(behaviour, ground_truth)
    v = _base_verdict(run, behaviour, word)
    if v is not None:
        v["text"] += _chat_evidence(run, behaviour, word)
    return v


def _nu_note(run: RunInputs, latent: int) -> str:
    """`` (ν_ε = …, ν_r = …; passes the fixed ν filter)`` for a latent, from the run's table and summary."""
    row = run.latents.set_index("latent").loc[latent] if latent in set(run.latents["latent"]) else None
    if row is None:
        return ""
    passed = [name for name in ("fixed", "data_driven")
              if latent in set(run.summary.get("filters", {}).get(name, {}).get("latents", []))]
    verdict = ("passes the " + " and ".join(p.replace("_", "-") for p in passed) + " ν filter" + ("s" if len(passed) > 1 else "")
               if passed else "fails the ν filters")
    return f" (ν_ε = {_fmt(row['nu_error'], 2)}, ν_r = {_fmt(row['nu_recon'], 2)}; {verdict})"


def _clean(d: dict | None) -> dict | None:
    return None if d is None else {k: _num(v) for k, v in d.items()}


def _clean_records(df: pd.DataFrame) -> list[dict]:
    return [_clean(r) for r in df.to_dict("records")]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * float(v):.0f}%"


def report_numbers(runs: Sequence[RunInputs], ground_truth: dict | None = None) -> dict:
    """The report's numbers (``report.json``; flat keys suit ``dvc metrics show``)."""
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
            d["training"] = {k: _num(r.metrics.get(k)) for k in ("fve_base", "fve_chat", "l0", "dead_fraction", "mse")
                             if k in r.metrics}
        t = kl_table(r)
        if len(t):
            d["kl_gap_closed"] = {row["set"]: {c: _num(row[f"gap_{c}"]) for c in CATEGORIES} for _, row in t.iterrows()}
            d["kl"] = {row["set"]: {c: _num(row[f"kl_{c}"]) for c in CATEGORIES} for _, row in t.iterrows()}
        v = behaviour_verdict(r, ground_truth=ground_truth)
        if v is not None:
            d["refusal_steering"] = v
        out["runs"][r.name] = d
    if ground_truth is not None:
        out["ground_truth_rates"] = ground_truth.get("rates")
    return out


# ---- figures ---------------------------------------------------------------------------------------

def plot_class_counts(runs: Sequence[RunInputs], path: str | os.PathLike) -> Path:
    """Latents per class, one bar group per class, one bar per crosscoder (log scale)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    w = 0.8 / max(1, len(runs))
    x = np.arange(len(CLASSES))
    for i, r in enumerate(runs):
        counts = [int(r.summary.get("classes", {}).get(c, 0)) for c in CLASSES]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * w, counts, w, label=r.name, color=f"C{i}")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, CLASSES)
    ax.set_yscale("log")
    ax.set_ylabel("latents (log)")
    ax.set_title("latents per Δnorm class", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_kl_gap(runs: Sequence[RunInputs], path: str | os.PathLike) -> Path | None:
    """% of the KL gap each set closes, one panel per token group, one bar per crosscoder; the random sets
    as mean with a ±std error bar."""
    import matplotlib.pyplot as plt

    tables = [(r.name, kl_table(r)) for r in runs if r.kl]
    if not tables:
        return None
    fig, axes = plt.subplots(1, len(CATEGORIES), figsize=(4.2 * len(CATEGORIES), 3.8), sharey=True)
    names = [s for s in KL_BAR_SETS if any(s in set(t["set"]) for _, t in tables)]
    x = np.arange(len(names))
    w = 0.8 / len(tables)
    for ax, c in zip(np.atleast_1d(axes), CATEGORIES):
        for i, (name, t) in enumerate(tables):
            t = t.set_index("set").reindex(names)
            y = 100 * t[f"gap_{c}"].astype(float).to_numpy()
            err = 100 * t[f"gap_std_{c}"].astype(float).fillna(0).to_numpy() if f"gap_std_{c}" in t else None
            ax.bar(x + (i - (len(tables) - 1) / 2) * w, np.nan_to_num(y), w, yerr=err, capsize=2, label=name, color=f"C{i}")
        lo, hi = ax.get_ylim()
        if lo < -150:  # a set that widens the gap many times over would flatten the others: clip, and label it
            ax.set_ylim(-150, max(hi, 110))
            for bar in ax.patches:
                if bar.get_height() < -150:
                    ax.annotate(f"{bar.get_height():.0f}%", (bar.get_x() + bar.get_width() / 2, -150), fontsize=7,
                                ha="center", va="bottom", rotation=90)
        ax.axhline(100, color="k", lw=0.6, ls=":")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(CATEGORY_TITLES.get(c, c), fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("% of KL gap closed (h_base 0%, h_chat 100%)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


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


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v)  # the template escapes it


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


# ---- the page --------------------------------------------------------------------------------------

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cfd8dc;font-size:12px}
nav{padding:6px 24px;background:#eceff1;font-size:13px}nav a{margin-right:14px;color:#1565c0}
main{padding:8px 24px 40px;max-width:1500px}
h2{border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f0f3f5;position:sticky;top:0}td.l,th.l{text-align:left}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \2195";color:#999}
.row{display:flex;flex-wrap:wrap;gap:18px}.fig{background:#fff;border:1px solid #ddd;padding:6px}
.fig img{max-width:100%;height:auto;display:block}.fig .cap{font-size:12px;color:#555;margin-top:4px}
.verdict{padding:10px 14px;border-left:5px solid #2e7d32;background:#e8f5e9;margin:10px 0}
.verdict.none{border-color:#c62828;background:#ffebee}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;border-radius:2px}
.tok.focus{outline:1px solid #000}.tok.tmpl{text-decoration:underline dotted #1565c0}
.ctx{margin:3px 0;max-width:900px}.ctx .a{display:inline-block;width:56px;color:#555;font-size:11px}
svg.hist rect{fill:#546e7a}details summary{cursor:pointer;color:#1565c0}
input.search{padding:5px 8px;width:340px;margin:6px 0;border:1px solid #bbb;border-radius:3px}
.muted{color:#777}.small{font-size:12px}td.gen{max-width:420px;text-align:left;font-family:ui-monospace,monospace;font-size:11px}
</style></head><body>
<header><h1>{{ title }}</h1><p>{{ subtitle }}</p></header>
<nav><a href="#overview">Overview</a><a href="#classes">Classes</a><a href="#dnorm">Δnorm</a><a href="#nu">ν</a>
<a href="#kl">KL gap</a><a href="#decoupling">Decoupling</a>{% if behaviours %}<a href="#behaviours">Planted behaviours</a>{% endif %}<a href="#cards">Latent cards</a></nav>
<main>
<h2 id="overview">Overview</h2>
<table id="overview-table"><tr><th class="l">crosscoder</th><th>kind</th><th>latents</th><th>k / λ</th>
<th>FVE base</th><th>FVE chat</th><th>L0</th><th>dead</th>{% for c in classes %}<th>{{ c }}</th>{% endfor %}
<th>chat-only, ν filters (fixed / data / both)</th><th>decoupling pairs</th></tr>
{% for o in overview %}<tr><td class="l">{{ o.name }}</td><td>{{ o.kind }}</td><td>{{ o.dict_size }}</td><td>{{ o.k }}</td>
<td>{{ o.fve_base }}</td><td>{{ o.fve_chat }}</td><td>{{ o.l0 }}</td><td>{{ o.dead }}</td>
{% for c in classes %}<td>{{ o.classes.get(c, 0) }}</td>{% endfor %}<td>{{ o.survivors }}</td><td>{{ o.pairs }}</td></tr>{% endfor %}
</table>
<p class="small muted">Classes by Δnorm = ½((‖d<sup>c</sup>‖ − ‖d<sup>b</sup>‖)/max + 1): chat-only &gt; 0.9, base-only &lt; 0.1, shared 0.4–0.6.
ν filters keep chat-only latents with low ν<sub>ε</sub> (no Complete Shrinkage) and low ν<sub>r</sub> (no Latent Decoupling).</p>

<h2 id="classes">Class counts</h2>
<div class="row"><div class="fig"><img alt="class counts" src="{{ figs.class_counts }}"></div></div>

<h2 id="dnorm">Δnorm histograms</h2>
<div class="row">{% for r in per_run %}<div class="fig"><img alt="delta norm histogram {{ r.name }}" src="{{ r.delta_norm }}"><div class="cap">{{ r.name }}</div></div>{% endfor %}</div>

<h2 id="nu">Latent Scaling: ν<sub>ε</sub> vs ν<sub>r</sub> of chat-only latents</h2>
<div class="row">{% for r in per_run %}<div class="fig"><img alt="nu scatter {{ r.name }}" src="{{ r.nu_scatter }}"><div class="cap">{{ r.name }}</div></div>{% endfor %}</div>
<div class="row">{% for r in per_run %}<div class="fig"><img alt="beta distributions {{ r.name }}" src="{{ r.beta }}"><div class="cap">{{ r.name }}: β per class</div></div>{% endfor %}</div>

<h2 id="kl">Causal evaluation: KL gap</h2>
<p class="small">KL(p<sub>chat</sub> ‖ p<sub>patched</sub>) per token when the chat model's layer-L activation is replaced by
h<sub>S</sub> = h<sub>base</sub> + Σ<sub>j∈S</sub> f<sub>j</sub>(d<sub>j</sub><sup>chat</sup> − d<sub>j</sub><sup>base</sup>);
% closed = 1 − KL<sub>S</sub>/KL<sub>base</sub> (h<sub>base</sub> 0%, h<sub>chat</sub> 100%).</p>
{% if figs.kl_gap %}<div class="row"><div class="fig"><img alt="KL gap bars" src="{{ figs.kl_gap }}"></div></div>{% endif %}
{% for r in per_run %}{% if r.kl_rows %}
<h3>{{ r.name }} <span class="small muted">({{ r.kl_tokens }})</span></h3>
<table class="kl-table"><tr><th class="l">set</th><th>size</th>{% for c in categories %}<th>KL {{ c }}</th><th>% closed {{ c }}</th>{% endfor %}<th class="l">what</th></tr>
{% for k in r.kl_rows %}<tr><td class="l">{{ k.set }}</td><td>{{ k.size }}</td>{% for c in categories %}<td>{{ k['kl_' ~ c] }}</td><td>{{ k['gap_' ~ c] }}</td>{% endfor %}<td class="l small">{{ k.description }}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">{{ r.name }}: no KL evaluation given.</p>{% endif %}{% endfor %}

<h2 id="decoupling">Decoupling suspects</h2>
<p class="small">Pairs of a chat-only and a base-only latent whose decoders have cosine above the threshold: one concept split in two.</p>
{% for r in per_run %}<h3>{{ r.name }}: {{ r.pairs_n }} pairs</h3>
{% if r.pairs %}<table class="pairs"><tr><th>chat-only latent</th><th>base-only latent</th><th>cosine</th><th>fire together (given chat)</th><th>Jaccard</th></tr>
{% for p in r.pairs %}<tr><td>{{ p.chat_latent }}</td><td>{{ p.base_latent }}</td><td>{{ p.cosine }}</td><td>{{ p.cofire }}</td><td>{{ p.jaccard }}</td></tr>{% endfor %}</table>{% endif %}{% endfor %}

{% if behaviours %}<h2 id="behaviours">Planted behaviours</h2>
<p class="small">The default pair's chat model was fine-tuned with planted behaviours (ground truth). Unsteered rates on trigger prompts:
{% for b in behaviours.rates %}{{ b.name }}: chat {{ b.chat }}, base {{ b.base }}{% if not loop.last %}; {% endif %}{% endfor %}.</p>
{% for r in behaviours.runs %}<h3>{{ r.name }}</h3>
{% if r.verdict %}<div class="verdict{% if not r.verdict.found %} none{% endif %}">{{ r.verdict.text }}</div>{% endif %}
{% if r.effects %}<details><summary>refusal rate in the base model under steering (every chat-only latent and a tried)</summary>
<table class="sortable effects"><thead><tr><th>latent</th><th class="l">class</th><th>ν rank</th><th>a</th><th>refusal on triggers</th><th>unsteered</th><th>refusal elsewhere</th><th>onset on triggers</th><th>unsteered</th><th>onset elsewhere</th><th>KL</th></tr></thead><tbody>
{% for e in r.effects %}<tr><td>{{ e.latent }}</td><td class="l">{{ e['class'] }}</td><td>{{ e.nu_rank }}</td><td>{{ e.alpha }}</td><td>{{ e.trigger_rate }}</td><td>{{ e.trigger_rate_unsteered }}</td><td>{{ e.other_rate }}</td><td>{{ e.onset_trigger_rate }}</td><td>{{ e.onset_trigger_rate_unsteered }}</td><td>{{ e.onset_other_rate }}</td><td>{{ e.kl_mean }}</td></tr>{% endfor %}
</tbody></table></details>{% endif %}
{% if r.tracking %}<p>Latents that track the planted behaviours (AUROC of the latent's largest activation on a prompt: trigger prompts vs the rest):</p>
<table class="tracking"><tr><th class="l">behaviour</th><th>latent</th><th class="l">class</th><th>AUROC</th><th>mean act. on triggers</th><th>elsewhere</th><th>ν rank</th></tr>
{% for t in r.tracking %}<tr><td class="l">{{ t.behaviour }}</td><td>{{ t.latent }}</td><td class="l">{{ t['class'] }}</td><td>{{ t.auroc }}</td><td>{{ t.on }}</td><td>{{ t.off }}</td><td>{{ t.nu_rank }}</td></tr>{% endfor %}</table>{% endif %}
{% endfor %}{% endif %}

<h2 id="cards">Latent cards</h2>
<p class="small">Chat-only latents (most chat-specific first) and a sample of shared ones. Click a column to sort; type to filter
(a number picks that latent id; other words match the class or the text of the top contexts). Tokens are shaded by activation; the top token is boxed; dotted underline = template token.</p>
<input class="search" type="search" placeholder="filter latents…" data-table="cards-table" aria-label="filter latent cards">
<span class="small muted" id="cards-count"></span>
<table id="cards-table" class="sortable searchable"><thead><tr><th class="l">crosscoder</th><th>latent</th><th class="l">class</th><th>Δnorm</th><th>ν_ε</th><th>ν_r</th><th>ν rank</th>
<th>freq</th><th>max act</th><th>template share</th><th>AUROC refusal</th><th>base refusal (best a)</th><th class="l">histogram</th><th class="l">contexts and steering</th></tr></thead><tbody>
{% for c in cards %}<tr data-latent="{{ c.latent }}" data-search="{{ c.search }}"><td class="l">{{ c.run }}</td><td>{{ c.latent }}</td><td class="l">{{ c['class'] }}</td><td>{{ f(c.delta_norm) }}</td>
<td>{{ f(c.nu_error) }}</td><td>{{ f(c.nu_recon) }}</td><td>{{ f(c.nu_rank) }}</td><td>{{ f(c.freq) }}</td><td>{{ f(c.max_act) }}</td>
<td>{{ f(c.template_share) }}</td><td>{{ f(c.auroc_refusal) }}</td><td>{% if c.base_refusal is not none %}{{ pct(c.base_refusal) }} (a={{ c.base_refusal_alpha }}){% endif %}</td>
<td class="l">{{ c.hist|safe }}</td><td class="l"><details><summary>{{ c.contexts|length }} contexts{% if c.steering %}, steering{% endif %}</summary>
{% for x in c.contexts %}<div class="ctx"><span class="a">{{ f(x.act) }} {{ x.source }}</span>{{ x.html|safe }}</div>{% endfor %}
{% if c.steering %}<table class="steer"><tr><th>model</th><th>a</th><th>KL</th><th class="l">behaviour rates (triggers)</th><th class="l">examples</th></tr>
{% for s in c.steering %}<tr><td>{{ s.model }}</td><td>{{ s.alpha }}</td><td>{{ f(s.kl_mean) }}</td><td class="l">{% for k, v in s.rates.items() %}{{ k }} {{ pct(v) }} {% endfor %}</td>
<td class="gen">{% for e in s.examples %}<div>» {{ e.prompt }} → {{ e.response }}</div>{% endfor %}</td></tr>{% endfor %}</table>{% endif %}
</details></td></tr>{% endfor %}</tbody></table>
<p class="small muted">Generated {{ generated }} by crossdiff. Inputs: {{ inputs }}</p>
</main>
<script>
(function(){
  "use strict";
  function key(td){var t=td.textContent.trim();var n=parseFloat(t);return (t!==""&&!isNaN(n)&&/^[-+0-9.e%]+/i.test(t))?n:t.toLowerCase();}
  document.querySelectorAll("table.sortable").forEach(function(table){
    var ths=table.querySelectorAll("thead th");
    ths.forEach(function(th,i){th.addEventListener("click",function(){
      var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
      var dir=th.getAttribute("data-dir")==="asc"?-1:1;ths.forEach(function(o){o.removeAttribute("data-dir");});
      th.setAttribute("data-dir",dir===1?"asc":"desc");
      rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
        if(x===""&&y!=="")return 1;if(y===""&&x!=="")return -1;
        if(typeof x===typeof y)return (x<y?-1:x>y?1:0)*dir;return (typeof x==="number"?-1:1)*dir;});
      rows.forEach(function(r){body.appendChild(r);});});});});
  document.querySelectorAll("input.search").forEach(function(inp){
    var table=document.getElementById(inp.getAttribute("data-table"));var count=document.getElementById("cards-count");
    function apply(){var q=inp.value.trim().toLowerCase().split(/\s+/).filter(Boolean);var shown=0;
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){var s=(r.getAttribute("data-search")||"").toLowerCase();
        var id=r.getAttribute("data-latent");
        var ok=q.every(function(w){return /^[0-9]+$/.test(w)?w===id:s.indexOf(w)>=0;});r.style.display=ok?"":"none";if(ok)shown++;});
      if(count)count.textContent=shown+" of "+table.tBodies[0].rows.length+" latents";}
    inp.addEventListener("input",apply);apply();});
})();
</script>
</body></html>
"""


def _overview(r: RunInputs) -> dict:
    s, cc = r.summary, r.summary.get("crosscoder", {})
    f = s.get("filters", {})
    m = r.metrics or {}
    return {"name": r.name, "kind": cc.get("kind"), "dict_size": cc.get("dict_size"),
            "k": cc.get("k") if cc.get("kind") == "batchtopk" else cc.get("l1_coeff"),
            "fve_base": _fmt(m.get("fve_base")), "fve_chat": _fmt(m.get("fve_chat")), "l0": _fmt(m.get("l0")),
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
                        "auroc": _fmt(row[col]), "on": _fmt(row[f"mean_act_{b['name']}"]),
                        "off": _fmt(row[f"mean_act_not_{b['name']}"]), "nu_rank": _fmt(row["nu_rank"])})
    return out


def build_report(runs: Sequence[RunInputs], out_dir: str | os.PathLike, *, title: str = "crossdiff report",
                 subtitle: str = "", ground_truth: dict | None = None) -> dict[str, Path]:
    """Write ``report.html`` (self-contained), ``figures/*.png``, ``report.json`` (numbers) and
    ``kl_gap.json`` (one record per crosscoder, set and token group: DVC plots) into ``out_dir``."""
    import jinja2

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
        kl_rows = [{**row, **{f"kl_{c}": _fmt(row[f"kl_{c}"], 4) for c in CATEGORIES},
                    **{f"gap_{c}": _gap_text(row, c) for c in CATEGORIES}, "size": _fmt(row["size"])}
                   for row in t.to_dict("records")] if len(t) else []
        dec = r.summary.get("decoupling", {})
        pairs = [{"chat_latent": p["chat_latent"], "base_latent": p["base_latent"], "cosine": _fmt(p["cosine"]),
                  "cofire": _fmt(p.get("cofire_given_chat")), "jaccard": _fmt(p.get("jaccard"))}
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
                "chat": _pct(rates.get("chat", {}).get("rates", {}).get(b["name"], {}).get("trigger_rate")),
                "base": _pct(rates.get("base", {}).get("rates", {}).get(b["name"], {}).get("trigger_rate"))}
               for b in ground_truth["behaviours"]]
        bruns = []
        for r in runs:
            eff = refusal_effects(r.steering, "refusal", "base") if r.steering else pd.DataFrame()
            bruns.append({"name": r.name, "verdict": numbers["runs"][r.name].get("refusal_steering"),
                          "effects": [{k: (_pct(v) if "rate" in k else _fmt(v)) for k, v in e.items()}
                                      for e in eff.sort_values(["rise", "latent"], ascending=[False, True]).to_dict("records")]
                          if len(eff) else [],
                          "tracking": _tracking_rows(r, ground_truth)})
        behaviours = {"rates": brs, "runs": bruns}
    cards = [c for r in runs for c in _card_rows(r)]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_TEMPLATE).render(
        title=title, subtitle=subtitle or " vs ".join(names), classes=CLASSES, categories=CATEGORIES,
        overview=[_overview(r) for r in runs], figs=figs, per_run=per_run, behaviours=behaviours, cards=cards,
        f=_fmt, pct=_pct, generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        inputs="; ".join(f"{r.name}: " + ", ".join(f"{k}={v}" for k, v in r.paths.items()) for r in runs))
    paths = {"html": out / "report.html", "json": out / "report.json", "kl_plot": out / "kl_gap.json"}
    atomic_write(paths["html"], lambda p: Path(p).write_text(page, encoding="utf-8"))
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n"))
    records = [{"crosscoder": r.name, "set": row["set"], "category": c, "gap_closed": _num(row[f"gap_{c}"]),
                "kl": _num(row[f"kl_{c}"])}
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
