"""PNG plots of a latent analysis (matplotlib, Agg backend): the Δnorm histogram, ν_ε vs ν_r of the
chat-only latents against the shared latents' interval, and the β distributions per class."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .fileio import atomic_write  # noqa: E402
from .decoder_norms import CHAT_ONLY, CLASSES, SHARED  # noqa: E402
from .latent_scaling import TARGETS  # noqa: E402

CLASS_COLOURS = {"chat_only": "tab:red", "base_only": "tab:blue", "shared": "tab:green", "other": "tab:gray"}


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
