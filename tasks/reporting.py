"""The report: latent cards per crosscoder, then one self-contained HTML page comparing them."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json


@task(name="latent-cards", cache_policy=NONE)
def cards_task(crosscoder_dir: str, latents: str, cache_dir: str, out: str, settings: dict,
               steering: str | None = None, tracking: str | None = None) -> str:
    """:func:`crossdiff_core.cards.cards_for` (chat-only latents and a shared sample) -> ``out`` (JSON)."""
    import json

    import pandas as pd

    from crossdiff_core.cards import CardsConfig, cards_for

    cfg = CardsConfig.from_dict(settings)
    steer = json.loads(Path(steering).read_text()) if steering and Path(steering).is_file() else None
    track = pd.read_parquet(tracking) if tracking and Path(tracking).is_file() else None
    write_json(cards_for(crosscoder_dir, latents, cache_dir, cfg, steering=steer, tracking=track), out)
    return out


@task(name="build-report", cache_policy=NONE)
def report_task(runs: dict[str, dict], out_dir: str, *, title: str, ground_truth: str | None,
                locate: str | None = None, scoreboard: str | None = None) -> dict:
    """``runs``: name -> paths (latents, kl, cards, steering, tracking, crosscoder). ``ground_truth``: the toy
    pair's (for the rates measured at build; the behaviours themselves come with the steering results).
    ``locate``: the locate stage's JSON (the layer sweep section); ``scoreboard``: the scoreboard stage's JSON
    (the "Scoreboard" section). Returns the output paths."""
    from crossdiff_core.report.inputs import load_run
    from crossdiff_core.report.page import build_report

    loaded = [load_run(name, p["latents"], **{k: p.get(k) for k in ("kl", "cards", "steering", "tracking", "crosscoder")})
              for name, p in runs.items()]
    paths = build_report(loaded, out_dir, title=title, behaviours=ground_truth, locate=locate, scoreboard=scoreboard)
    return {k: str(v) for k, v in paths.items()}
