"""Steering with a crosscoder's latents, and (for a pair with planted behaviours) which latents track them."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import atomic_write, write_json

STEERING = "steering.json"
TRACKING = "tracking.parquet"


@task(name="steer", cache_policy=NONE)
def steer_task(crosscoder_dir: str, latents: str, out_dir: str, settings: dict, ground_truth: str | None,
               fallback_chats: dict | None = None) -> dict:
    """:func:`crossdiff_core.steering.steer_crosscoder` -> ``out_dir`` (steering.json, tracking.parquet).
    ``settings``: params.yaml's ``steer`` section. Prompts: ``steer.prompts`` (a file), else the ground
    truth's, else the first user turns of ``fallback_chats`` (``{"chats": [...], "messages_column": ...}``)."""
    from crossdiff_core.errors import ConfigError
    from crossdiff_core.headlines import steering_headline
    from crossdiff_core.steering import SteerConfig, first_user_turns, steer_crosscoder

    cfg, out = SteerConfig.from_dict(settings), Path(out_dir)
    prompts = None
    if not cfg.prompts and ground_truth is None:
        if not (fallback_chats and fallback_chats.get("chats")):
            raise ConfigError("steering needs prompts: set steer.prompts in params.yaml (a .txt/.jsonl file)")
        n = {"n": cfg.max_prompts} if cfg.max_prompts else {}
        prompts = first_user_turns(fallback_chats["chats"], fallback_chats["messages_column"], **n)
    res, track = steer_crosscoder(crosscoder_dir, latents, prompts=prompts, ground_truth=ground_truth, cfg=cfg)
    if track is not None:
        atomic_write(out / TRACKING, lambda p: track.to_parquet(p, index=False))
    write_json(res, out / STEERING)
    return steering_headline(res)
