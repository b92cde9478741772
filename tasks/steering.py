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
    Prompts: ``settings["prompts"]`` (a file), else the ground truth's, else the first user turns of
    ``fallback_chats`` (``{"chats": [...], "messages_column": ...}``)."""
    from crossdiff_core.errors import ConfigError
    from crossdiff_core.steering import SteerConfig, first_user_turns, headline, read_prompts, steer_crosscoder

    s, out = settings, Path(out_dir)
    prompts = None
    if s.get("prompts"):
        prompts = read_prompts(s["prompts"])
    elif ground_truth is None:
        if not (fallback_chats and fallback_chats.get("chats")):
            raise ConfigError("steering needs prompts: set steer.prompts in params.yaml (a .txt/.jsonl file)")
        prompts = first_user_turns(fallback_chats["chats"], fallback_chats.get("messages_column", "messages"),
                                   int(s.get("max_prompts") or 200))
    cfg = SteerConfig(alphas=tuple(s.get("alphas", (-0.5, 0.5, 1.0, 1.5))), max_new_tokens=int(s.get("max_new_tokens", 20)),
                      batch_size=int(s.get("batch_size", 64)), progress=bool(s.get("progress", False)))
    res, track = steer_crosscoder(crosscoder_dir, latents, prompts=prompts, ground_truth=ground_truth,
                                  steer_latents=s.get("latents"), n_top=int(s.get("n_top", 8)),
                                  n_tracking=int(s.get("n_tracking", 4)), n_shared=int(s.get("n_shared", 2)),
                                  max_prompts=s.get("max_prompts"), seed=int(s.get("seed", 0)), cfg=cfg,
                                  dtype=s.get("dtype", "float32"), device=s.get("device", "cpu"))
    if track is not None:
        atomic_write(out / TRACKING, lambda p: track.to_parquet(p, index=False))
    write_json(res, out / STEERING)
    return headline(res)
