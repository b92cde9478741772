"""The report's layer sweep ("Where does the change live?"): a ``crossdiff locate`` JSON next to the
layer the crosscoders read.

:func:`read_locate` checks the file; :func:`cached_layers` finds the block each crosscoder was trained on
(what its KL evaluation or steering records, else its training cache's manifest); :func:`layer_sweep` draws
the KL-per-block plot with the recommended and the cached blocks marked and says in one sentence where
the change is strongest and which block the crosscoders read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CacheError, CrossdiffError
from ..runs import cache_manifest, read_stage_json
from .inputs import RunInputs

WHAT = "a layer sweep of `crossdiff locate`"
# the per-block series a "strongest" block is read from, in order of preference (the first present)
SERIES = (("kl_first9", "KL on the first 9 answer tokens"),
          ("kl_first_token_trigger", "KL at the first answer token of the trigger prompts"),
          ("kl_response", "KL on all answer tokens"), ("kl_template", "KL on the template tokens"))


def read_locate(path: str | os.PathLike) -> dict:
    """The ``crossdiff locate`` JSON at ``path``: ``per_layer`` rows with an int ``layer`` each and an int
    ``recommended_layer`` among them (else a :class:`CrossdiffError` naming the file and the fix)."""
    d = read_stage_json(path, required=("per_layer", "recommended_layer"))
    rows = d["per_layer"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and isinstance(r.get("layer"), int)
                                                         for r in rows):
        raise CrossdiffError(f"{path}: `per_layer` is not a list of objects with an int `layer`; it is not {WHAT}: "
                             "pass the JSON `crossdiff locate --out` wrote (or re-run it)")
    if d["recommended_layer"] not in [r["layer"] for r in rows]:
        raise CrossdiffError(f"{path}: recommended_layer {d['recommended_layer']!r} is not one of its blocks; it is "
                             f"not {WHAT}: re-run `crossdiff locate`")
    return d


def cached_layers(runs: Sequence[RunInputs]) -> dict[str, int]:
    """``{run name: block}`` for the runs whose layer is known: the ``inputs.layer`` of their KL evaluation or
    steering sweep, else the ``layer`` of the cache their analysis read (when its manifest is still there)."""
    out: dict[str, int] = {}
    for r in runs:
        for d in (r.kl, r.steering):
            layer = ((d or {}).get("inputs") or {}).get("layer")
            if isinstance(layer, int):
                out[r.name] = layer
                break
        else:
            path = (r.summary.get("cache") or {}).get("path")
            try:
                layer = cache_manifest(path)[0].get("layer") if path else None
            except CacheError:
                layer = None
            if isinstance(layer, int):
                out[r.name] = layer
    return out


def _series(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str, np.ndarray] | None:
    for key, label in SERIES:
        v = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])
        if np.isfinite(v).any():
            return key, label, v
    return None


def sweep_sentence(loc: Mapping[str, Any], cached: Sequence[int]) -> str:
    """One sentence: the block after which the change is strongest, the recommended block, and the block(s)
    the crosscoders read (with the share of the largest effect that is already there)."""
    rows = loc["per_layer"]
    layers = [r["layer"] for r in rows]
    rec = loc["recommended_layer"]
    s = _series(rows)
    if s is None:
        head = f"The layer sweep has no KL values; it recommends block {rec}"
        share = {}
    else:
        _, label, v = s
        peak = layers[int(np.nanargmax(v))]
        top = float(np.nanmax(v))
        head = (f"The change is strongest after block {peak} ({label}: {top:.3g} nats when the base model's block "
                f"output is patched into the chat model); the sweep recommends block {rec}")
        share = {L: float(v[layers.index(L)]) / top for L in cached if L in layers and top > 0
                 and math.isfinite(float(v[layers.index(L)]))}
    if not cached:
        return head + "; which block the crosscoders read is not recorded."
    read = ", ".join(f"{L}" + (f" ({100 * share[L]:.0f}% of that largest KL)" if L in share else "")
                     for L in sorted(set(cached)))
    where = "" if set(cached) == {rec} else (
        " — earlier than the recommendation: the crosscoders see only what the first blocks changed"
        if max(cached) < rec else " — later than the recommendation")
    return f"{head}; the crosscoders read block {read}{where}."


def layer_sweep(locate: str | os.PathLike | Mapping[str, Any] | None, runs: Sequence[RunInputs],
                figdir: str | os.PathLike) -> dict | None:
    """The report's layer-sweep section (None without a locate result): ``{"png", "sentence", "numbers"}``
    (``numbers``: what report.json records: recommended and cached blocks, the rule, per-block KL)."""
    if locate is None:
        return None
    from ..locate import plot_locate

    loc = dict(locate) if isinstance(locate, Mapping) else read_locate(locate)
    by_run = cached_layers(runs)
    cached = sorted(set(by_run.values()))
    png = plot_locate(loc, Path(figdir) / "layer_sweep.png", cached=cached)
    numbers = {"recommended_layer": loc["recommended_layer"], "recommended_by": loc.get("recommended_by"),
               "rule": loc.get("rule"), "cached_layers": by_run,
               "source": None if isinstance(locate, Mapping) else str(locate),
               "per_layer": [{k: r.get(k) for k in ("layer", "kl_first9", "kl_response", "kl_template",
                                                     "kl_first_token_trigger", "p_first_token_trigger") if k in r}
                             for r in loc["per_layer"]]}
    return {"png": png, "sentence": sweep_sentence(loc, cached), "numbers": numbers}
