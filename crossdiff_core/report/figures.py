"""Every PNG figure of crossdiff (matplotlib, Agg backend). Per analysis: the Δnorm histogram, ν_ε vs ν_r
of the chat-only latents against the shared latents' interval, and the β distributions per class
(:func:`plot_all`). Across the crosscoders of a report: latents per class (:func:`plot_class_counts`) and
the share of the KL gap each set closes (:func:`plot_kl_gap`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..decoder_norms import CHAT_ONLY, CLASSES, SHARED  # noqa: E402
from ..fileio import atomic_write  # noqa: E402
from ..kl_eval import CATEGORIES  # noqa: E402
from ..latent_scaling import TARGETS  # noqa: E402
from .inputs import RunInputs  # noqa: E402
from .numbers import kl_table  # noqa: E402

KL_BAR_SETS = ("chat_only", "delta_norm_top", "delta_norm_bottom", "nu_top", "nu_bottom", "random", "top_chat",
               "top_chat_delta_norm", "top_chat_nu", "top_chat_random", "error", "reconstruction")
CATEGORY_TITLES = {"first9": "first 9 response tokens", "response": "all response tokens", "template": "template tokens"}

CLASS_COLOURS = {"chat_only": "tab:red", "base_only": "tab:blue", "shared": "tab:green", "other": "tab:gray",
                 "dead": "black"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def _robust_limits(*arrays: np.ndarray, lo_q: float = 1.0, hi_q: float = 99.0, pad: float = 0.1) -> tuple[float, float]:
    """Axis limits covering the ``lo_q``–``hi_q`` percentiles of the finite values and [0, 1] (ν and β
    can have huge outliers where a latent barely fires or β^c is near 0)."""
    v = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(0)
    if v.size == 0:
        return -0.1, 1.1
    lo, hi = np.percentile(v, [lo_q, hi_q])
    lo, hi = min(lo, 0.0), max(hi, 1.0)
    span = hi - lo
    return lo - pad * span, hi + pad * span


def plot_delta_norm(table: pd.DataFrame, path: str | os.PathLike, *, bins: int = 50) -> Path:
    """Histogram of Δnorm over all latents (log count), the class boundaries shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.axvspan(0.9, 1.0, color=CLASS_COLOURS["chat_only"], alpha=0.12, label="chat-only (> 0.9)")
    ax.axvspan(0.0, 0.1, color=CLASS_COLOURS["base_only"], alpha=0.12, label="base-only (< 0.1)")
    ax.axvspan(0.4, 0.6, color=CLASS_COLOURS["shared"], alpha=0.12, label="shared [0.4, 0.6]")
    ax.hist(table["delta_norm"].to_numpy(), bins=np.linspace(0, 1, bins + 1), color="black", histtype="step")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Δnorm  (0 = base-only, 1 = chat-only)")
    ax.set_ylabel("latents (log)")
    counts = table["class"].value_counts()
    ax.set_title("Δnorm: " + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in CLASSES), fontsize=9)
    ax.legend(fontsize=8, loc="upper center")
    return _save(fig, Path(path))


def plot_nu_scatter(table: pd.DataFrame, path: str | os.PathLike, *, shared_nu_error: tuple[float | None, float | None],
                    shared_nu_recon: tuple[float | None, float | None], nu_error_max: float, nu_recon_max: float,
                    truth: np.ndarray | None = None) -> Path:
    """ν_ε vs ν_r of the chat-only latents; the shared latents' intervals as bands, the fixed thresholds
    as dashed lines. ``truth`` (optional, per row of ``table``) colours points by a known label."""
    co = table[table["class"] == CHAT_ONLY]
    ne, nr = co["nu_error"].to_numpy(), co["nu_recon"].to_numpy()
    sh = table[table["class"] == SHARED]
    xlim = _robust_limits(ne, sh["nu_error"].to_numpy())
    ylim = _robust_limits(nr, sh["nu_recon"].to_numpy())
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    if None not in shared_nu_error:
        ax.axvspan(*shared_nu_error, color=CLASS_COLOURS["shared"], alpha=0.12, label="shared latents, 95% ν_ε")
    if None not in shared_nu_recon:
        ax.axhspan(*shared_nu_recon, color=CLASS_COLOURS["shared"], alpha=0.08, label="shared latents, 95% ν_r")
    ax.axvline(nu_error_max, color="k", ls="--", lw=0.8)
    ax.axhline(nu_recon_max, color="k", ls="--", lw=0.8, label=f"fixed: ν_ε < {nu_error_max}, ν_r < {nu_recon_max}")
    cx, cy = np.clip(ne, *xlim), np.clip(nr, *ylim)  # outliers drawn on the frame
    if truth is None:
        ax.scatter(cx, cy, s=10, color=CLASS_COLOURS["chat_only"], alpha=0.7, label=f"chat-only latents ({len(co)})")
    else:
        lab = np.asarray(truth)[co.index.to_numpy()]
        for i, name in enumerate(pd.unique(lab)):
            m = lab == name
            ax.scatter(cx[m], cy[m], s=10, alpha=0.7, color=f"C{i}", label=f"{name} ({int(m.sum())})")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("ν_ε = β_ε^base / β_ε^chat  (Complete Shrinkage when high)")
    ax.set_ylabel("ν_r = β_r^base / β_r^chat  (Latent Decoupling when high)")
    ax.set_title("Latent Scaling of chat-only latents (low-left = chat-specific)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(path))


def plot_beta_distributions(table: pd.DataFrame, path: str | os.PathLike, *, bins: int = 40) -> Path:
    """One panel per Latent Scaling target: the β histogram of each class (density, robust range)."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for ax, target in zip(axes.ravel(), TARGETS):
        col = table[f"beta_{target}"].to_numpy()
        lo, hi = _robust_limits(col, lo_q=2.0, hi_q=98.0)  # a few latents with tiny Σf² have huge β
        edges = np.linspace(lo, hi, bins + 1)
        for c in CLASSES:
            v = col[(table["class"] == c).to_numpy() & np.isfinite(col)]
            if v.size:
                ax.hist(np.clip(v, lo, hi), bins=edges, histtype="step", density=True,
                        color=CLASS_COLOURS[c], label=f"{c} ({v.size})")
        ax.set_title(f"β {target.replace('_', ' ')} (outliers clipped to the edges)", fontsize=9)
        ax.set_xlabel("β")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_all(table: pd.DataFrame, summary: dict, out_dir: str | os.PathLike) -> list[Path]:
    """The three analysis plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    dd = summary["filters"]["data_driven"]
    fx = summary["filters"]["fixed"]
    return [
        plot_delta_norm(table, out / "delta_norm_hist.png"),
        plot_nu_scatter(table, out / "nu_scatter.png", shared_nu_error=tuple(dd["shared_nu_error_interval"]),
                        shared_nu_recon=tuple(dd["shared_nu_recon_interval"]),
                        nu_error_max=fx["nu_error_max"], nu_recon_max=fx["nu_recon_max"]),
        plot_beta_distributions(table, out / "beta_by_class.png"),
    ]


def plot_class_counts(runs: Sequence[RunInputs], path: str | os.PathLike) -> Path:
    """Latents per class, one bar group per class, one bar per crosscoder (log scale)."""
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


def plot_dead_history(runs: Sequence[RunInputs], path: str | os.PathLike) -> Path | None:
    """The dead fraction over training, one line per crosscoder: on the held-out tokens (``dead_fraction``,
    solid) and unfired for the trainer's dead window (``dead_train_fraction``, dashed), from ``history.json``.
    None when no run has a history."""
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, r in enumerate(runs):
        steps = [h["step"] for h in r.history]
        for key, ls, what in (("dead_fraction", "-", "held-out"), ("dead_train_fraction", "--", "training window")):
            y = [h.get(key) for h in r.history]
            if any(v is not None for v in y):
                ax.plot(steps, [np.nan if v is None else 100 * v for v in y], ls, color=f"C{i}", label=f"{r.name} ({what})")
    ax.axhline(5, color="k", lw=0.6, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("dead latents (%)")
    ax.set_ylim(0, 100)
    ax.set_title("dead fraction over training (dotted: 5%)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))
