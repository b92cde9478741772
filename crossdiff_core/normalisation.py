"""Input normalisation of the crosscoder (DESIGN §1 "Input normalisation" and its Caution): which scalar
``s_m`` divides each model's activations before the weights see them.

Conventions (``train.crosscoder.normalisation``), from the cache's per-model mean squared norm
``q_m = E||x_m||²`` over ``d`` dims:

- ``per_model``: ``s_m = sqrt(q_m / d)``, so ``E||x_m / s_m||² = d`` for each model. A feature that
  writes the same vector in both models gets decoder norms in the ratio ``s_b / s_c``: when the chat
  model's norm grew for reasons that touch few directions (massive activations), every such feature
  moves off Δnorm 0.5 (to 0.38 at s_c / s_b = 1.32) and every ν is multiplied by ``s_c / s_b`` (the base
  decoder row, in normalised units, is ``s_c / s_b`` times the chat one; measured in bench/normalisation.py).
- ``joint``: one scalar for both, ``s² = (q_b + q_c) / (2 d)``: decoder norms stay in the models' own
  ratio (equal features at Δnorm 0.5, ν 1), and the inputs are still ``O(√d)``, which the default
  learning rate and λ assume.
- ``none``: ``s = 1``, raw model units (what the paper's code does); λ and lr then depend on the
  model's activation scale.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .errors import ConfigError

PER_MODEL, JOINT, NONE = "per_model", "joint", "none"
NORMALISATIONS = (PER_MODEL, JOINT, NONE)
# s_c / s_b outside this band under per_model moves equal features visibly off Δnorm 0.5 (1.1 -> ~0.45)
RATIO_BAND = (0.9, 1.1)


def check_normalisation(convention: str) -> str:
    if convention not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {convention!r}: use one of {NORMALISATIONS} "
                          "(train.crosscoder.normalisation)")
    return convention


def input_scales(mean_sq_norm: torch.Tensor, d_model: int, convention: str) -> torch.Tensor:
    """``[2]`` float32 ``(s_b, s_c)`` under ``convention`` from ``mean_sq_norm [2]`` = ``(q_b, q_c)``."""
    check_normalisation(convention)
    q = torch.as_tensor(mean_sq_norm, dtype=torch.float64).reshape(2)
    if not bool(torch.isfinite(q).all()) or not bool((q > 0).all()):
        raise ConfigError(f"the cache's mean squared norms must be finite and positive, got {q.tolist()}: "
                          "re-cache (the manifest's stats are broken) or use normalisation: none")
    if convention == NONE:
        return torch.ones(2, dtype=torch.float32)
    if convention == JOINT:
        q = q.mean().expand(2)
    return (q / d_model).sqrt().to(torch.float32)


def cache_scales(cache, convention: str) -> torch.Tensor:
    """``[2]`` ``(s_b, s_c)`` for an :class:`~crossdiff_core.cache.ActivationCache` (its manifest's stats)."""
    return input_scales(cache.mean_sq_norms(), cache.d_model, convention)


def norm_ratio(mean_sq_norm: Mapping[str, float]) -> float:
    """``sqrt(q_c / q_b)``: the per-model s_c / s_b, whatever convention was trained."""
    return math.sqrt(float(mean_sq_norm["chat"]) / float(mean_sq_norm["base"]))


def scales_warning(ratio: float, convention: str) -> str | None:
    """A warning when per-model scales ``s_c / s_b = ratio`` shift the decoder-norm statistics; else None."""
    lo, hi = RATIO_BAND
    if convention != PER_MODEL or lo <= ratio <= hi:
        return None
    dn = 0.5 * ((1.0 / ratio - 1.0) / max(1.0, 1.0 / ratio) + 1.0)
    return (f"the models' mean squared norms differ ({ratio ** 2:.2f}x, s_c/s_b = {ratio:.2f}) and this crosscoder "
            f"used per_model normalisation: a latent equal in both models' own units sits at Δnorm {dn:.2f}, not "
            f"0.5, and every ν is scaled by s_c/s_b = {ratio:.2f}, so the class cuts move; train with "
            "train.crosscoder.normalisation: joint (one scale, equal features stay at 0.5) or none (raw units, "
            "the paper's code)")


def scales_summary(scales: torch.Tensor, recorded: str | None, mean_sq_norm: Mapping[str, float]) -> dict:
    """``{base, chat, ratio, convention, norm_ratio, warning}`` for a crosscoder's ``scales [2]``: ``ratio`` is its
    s_c / s_b, ``norm_ratio`` the cache's per-model one (sqrt of the mean-square ratio, what per_model would use).
    ``recorded``: the crosscoder config's convention; None (older runs) infers it from the scales."""
    s_b, s_c = (float(v) for v in torch.as_tensor(scales).reshape(2).tolist())
    conv = recorded
    if conv is None:
        conv = NONE if s_b == s_c == 1.0 else JOINT if math.isclose(s_b, s_c, rel_tol=1e-6) else PER_MODEL
    r = norm_ratio(mean_sq_norm)
    return {"base": s_b, "chat": s_c, "ratio": s_c / s_b, "convention": conv, "norm_ratio": r,
            "warning": scales_warning(r, conv)}


def norm_growth(stats: Mapping[str, Mapping], top_k: int = 5) -> dict:
    """What carries each model's mean squared norm ``q_m = Σ_k E[x_mk²]`` and its growth ``q_c − q_b``, per dimension.

    ``stats``: the manifest's ``{"base": {"mean": [d], "mean_sq_norm": q, ["mean_sq": [d]]}, "chat": ...}``. The
    per-dim second moment ``E[x_k²]`` comes from the optional ``mean_sq`` when the writer recorded it; otherwise
    only its mean² part is known (``source: "mean"``), which is where massive activations (a few dims with a large,
    near-constant value) show up. Per model: the top ``top_k`` dims by |mean| with their share ``mean_k² / q``, and
    ``mean_share = ||mean||² / q``. ``growth``: ``q_c / q_b`` and the top dims by |δ_k| with ``δ_k / (q_c − q_b)``.
    """
    import numpy as np

    src = "mean_sq" if all("mean_sq" in stats[m] for m in ("base", "chat")) else "mean"
    out: dict = {"source": src, "top_k": top_k}
    per_dim = {}
    for m in ("base", "chat"):
        mu = np.asarray(stats[m]["mean"], dtype=np.float64)
        q = float(stats[m]["mean_sq_norm"])
        per_dim[m] = np.asarray(stats[m]["mean_sq"], dtype=np.float64) if src == "mean_sq" else mu ** 2
        top = np.argsort(-np.abs(mu), kind="stable")[:top_k]
        out[m] = {"mean_sq_norm": q, "mean_share": float((mu ** 2).sum() / q) if q > 0 else None,
                  "top_dims": [{"dim": int(i), "mean": float(mu[i]), "share": float(mu[i] ** 2 / q) if q > 0 else None}
                               for i in top]}
    q_b, q_c = out["base"]["mean_sq_norm"], out["chat"]["mean_sq_norm"]
    delta, dq = per_dim["chat"] - per_dim["base"], q_c - q_b
    top = np.argsort(-np.abs(delta), kind="stable")[:top_k]
    out["growth"] = {"ratio": q_c / q_b if q_b > 0 else None, "difference": dq,
                     "top_dims": [{"dim": int(i), "delta": float(delta[i]), "share": float(delta[i] / dq) if dq else None}
                                  for i in top],
                     "top_share": float(delta[top].sum() / dq) if dq else None}
    return out
