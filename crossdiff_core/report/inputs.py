"""What the report reads about each crosscoder: one :class:`RunInputs` per crosscoder, from the products of
the earlier stages (:func:`load_run`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import CrossdiffError
from ..runs import default_summary_path, read_stage_json


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


def _optional(path: str | os.PathLike | None) -> dict | None:
    return None if path is None else read_stage_json(path)


def load_run(name: str, latents: str | os.PathLike, *, summary: str | os.PathLike | None = None,
             kl: str | os.PathLike | None = None, cards: str | os.PathLike | None = None,
             steering: str | os.PathLike | None = None, tracking: str | os.PathLike | None = None,
             crosscoder: str | os.PathLike | None = None) -> RunInputs:
    """Read one crosscoder's artifacts. ``summary`` defaults to the analysis summary next to ``latents``;
    ``crosscoder`` (a directory) contributes its ``metrics.json`` when present."""
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
    return RunInputs(name, pd.read_parquet(lp), read_stage_json(sp), _optional(kl), _optional(cards),
                     _optional(steering), tr, metrics, paths)
