"""The report: latent cards per crosscoder, then one self-contained HTML page comparing them."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json


@task(name="latent-cards", cache_policy=NONE)
def cards_task(crosscoder_dir: str, latents: str, cache_dir: str, out: str, settings: dict,
               steering: str | None = None, tracking: str | None = None) -> str:
    """Top-activating contexts, histograms and statistics of the chat-only latents (and a shared sample)."""
    import json

    import pandas as pd
    from transformers import AutoTokenizer

    from crossdiff_core.cache import ActivationCache
    from crossdiff_core.cards import CardsConfig, card_latents, latent_cards
    from crossdiff_core.crosscoder import CrossCoder

    s = settings
    cc = CrossCoder.load(crosscoder_dir, device=s.get("device", "cpu"))
    table = pd.read_parquet(latents)
    cache = ActivationCache(cache_dir)
    tok = AutoTokenizer.from_pretrained(cache.manifest["models"]["chat"])
    known = CardsConfig.__dataclass_fields__
    cfg = CardsConfig(**{k: v for k, v in s.items() if k in known})
    chosen = card_latents(table, n_shared=cfg.n_shared, seed=cfg.seed, max_chat_only=cfg.max_chat_only)
    steer = json.loads(Path(steering).read_text()) if steering and Path(steering).is_file() else None
    track = pd.read_parquet(tracking) if tracking and Path(tracking).is_file() else None
    res = latent_cards(cc, cache, table, chosen, tok, cfg, steering=steer, tracking=track)
    res["inputs"] = {"crosscoder": crosscoder_dir, "latents": latents, "cache": cache_dir}
    write_json(res, out)
    return out


@task(name="build-report", cache_policy=NONE)
def report_task(runs: dict[str, dict], out_dir: str, *, title: str, ground_truth: str | None) -> dict:
    """``runs``: name -> paths (latents, kl, cards, steering, tracking, crosscoder). Returns the output paths."""
    from crossdiff_core.report import build_report, load_run

    loaded = [load_run(name, p["latents"], **{k: p.get(k) for k in ("kl", "cards", "steering", "tracking", "crosscoder")})
              for name, p in runs.items()]
    gt = None
    if ground_truth:
        from crossdiff_core.toy_models import load_ground_truth

        gt = load_ground_truth(ground_truth)
    paths = build_report(loaded, out_dir, title=title, ground_truth=gt)
    return {k: str(v) for k, v in paths.items()}
