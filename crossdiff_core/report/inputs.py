"""What the report reads about each crosscoder: one :class:`RunInputs` per crosscoder, from the products of
the earlier stages (:func:`load_run`).

Every input is checked before the report is built: each file exists and parses, has the structure its
stage writes (a missing column or key is named), and all of one run's products belong to one crosscoder:
the weights sha256 that ``latents.parquet`` records is the one the KL evaluation, the steering sweep and
the cards record in their ``inputs`` (and that of ``model.safetensors`` in the crosscoder directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import CrossdiffError
from ..fileio import file_sha256
from ..kl_eval import CATEGORIES
from ..runs import (CROSSCODER_SHA, check_same_crosscoder, default_summary_path, read_latents, read_stage_json,
                    read_tracking, recorded_crosscoder)


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
    history: list[dict] | None = None  # the crosscoder's history.json: one record per validation (step, dead_fraction, ...)


def _bad(path: Any, what: str, problem: str) -> CrossdiffError:
    return CrossdiffError(f"{path}: {problem}; it is not {what}: pass that stage's own output file (or re-run it)")


def _list_of_dicts(d: dict, key: str, path: Any, what: str, needs: tuple[str, ...]) -> None:
    items = d.get(key)
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise _bad(path, what, f"`{key}` is not a list of objects")
    for i, x in enumerate(items):
        missing = [k for k in needs if k not in x]
        if missing:
            raise _bad(path, what, f"{key}[{i}] lacks the keys {missing}")


def _check_kl(kl: dict, path: Any) -> None:
    what = "a KL-gap evaluation of `crossdiff evaluate`"
    _list_of_dicts(kl, "sets", path, what, ("name", "group", "kl", "gap_closed"))
    for i, s in enumerate(kl["sets"]):
        for key in ("kl", "gap_closed"):
            if not isinstance(s[key], dict) or any(c not in s[key] for c in CATEGORIES):
                raise _bad(path, what, f"sets[{i}].{key} lacks the token groups {list(CATEGORIES)}")
    if not isinstance(kl.get("groups", {}), dict):
        raise _bad(path, what, "`groups` is not an object")


def _optional(path: str | os.PathLike | None, check=None, required: tuple[str, ...] = ()) -> dict | None:
    if path is None:
        return None
    d = read_stage_json(path, required=required)
    if check is not None:
        check(d, path)
    return d


def load_run(name: str, latents: str | os.PathLike, *, summary: str | os.PathLike | None = None,
             kl: str | os.PathLike | None = None, cards: str | os.PathLike | None = None,
             steering: str | os.PathLike | None = None, tracking: str | os.PathLike | None = None,
             crosscoder: str | os.PathLike | None = None, allow_mismatch: bool = False) -> RunInputs:
    """Read and check one crosscoder's artifacts. ``summary`` defaults to the analysis summary next to
    ``latents``; ``crosscoder`` (a directory) contributes its ``metrics.json`` when present. Products of
    another crosscoder than the one ``latents`` was written for are refused unless ``allow_mismatch``."""
    lp = Path(latents)
    if not lp.is_file():
        raise CrossdiffError(f"{lp} does not exist: run `crossdiff analyze` first")
    table = read_latents(lp)
    sp = Path(summary) if summary else default_summary_path(lp)
    summ = read_stage_json(sp, required=("classes",))
    kl_d = _optional(kl, _check_kl)
    cards_d = _optional(cards, lambda d, p: _list_of_dicts(d, "cards", p, "latent cards of `crossdiff cards`", ("latent",)),
                        required=("cards",))
    steer_d = _optional(steering, lambda d, p: _list_of_dicts(d, "latents", p, "a steering sweep of `crossdiff steer`",
                                                              ("latent", "runs")), required=("latents",))
    tr = read_tracking(tracking) if tracking else None
    metrics = None
    if crosscoder is not None and (Path(crosscoder) / "metrics.json").is_file():
        metrics = read_stage_json(Path(crosscoder) / "metrics.json")
    history = _history(Path(crosscoder) / "history.json") if crosscoder is not None else None
    recorded = recorded_crosscoder(lp)
    what = f"the latents table {lp} (run {name!r})"
    for opt, path, d in (("kl", kl, kl_d), ("cards", cards, cards_d), ("steering", steering, steer_d)):
        inputs = (d or {}).get("inputs") or {}
        if isinstance(inputs, dict) and inputs.get(CROSSCODER_SHA):
            check_same_crosscoder(f"{what}", recorded, (f"{inputs.get('crosscoder')} (per --{opt} {path})",
                                                        inputs[CROSSCODER_SHA]), allow_mismatch=allow_mismatch)
    if crosscoder is not None and recorded[1] and (Path(crosscoder) / "model.safetensors").is_file():
        check_same_crosscoder(what, recorded, (str(crosscoder), file_sha256(Path(crosscoder) / "model.safetensors")),
                              allow_mismatch=allow_mismatch)
    paths = {k: str(v) for k, v in dict(latents=lp, summary=sp, kl=kl, cards=cards, steering=steering,
                                        tracking=tracking, crosscoder=crosscoder).items() if v}
    return RunInputs(name, table, summ, kl_d, cards_d, steer_d, tr, metrics, paths, history=history)


def _history(path: Path) -> list[dict] | None:
    """The trainer's ``history.json`` (a list of records with a ``step``), None when absent."""
    if not path.is_file():
        return None
    import json

    try:
        h = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, "a training history (history.json)", f"not readable JSON ({exc})") from None
    if not isinstance(h, list) or not all(isinstance(x, dict) and "step" in x for x in h):
        raise _bad(path, "a training history (history.json)", "not a list of records with a `step`")
    return h
