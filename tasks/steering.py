"""Steering with a crosscoder's latents, and (for a pair with a behaviour spec) which latents track its behaviours."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import atomic_write, write_json
from .products import STEERING, TRACKING  # noqa: F401  (the steer products' names)


def behaviours_for(pair: dict) -> str | None:
    """The behaviour spec the locate and steer stages use: the ``behaviours`` that ``pair.json`` records
    (``models.behaviours``, else the toy pair's ground truth), else its ``ground_truth`` (a pair.json written
    before ``behaviours`` was recorded), else None."""
    return pair.get("behaviours") or pair.get("ground_truth")


@task(name="steer", cache_policy=NONE)
def steer_task(crosscoder_dir: str, latents: str, out_dir: str, settings: dict, behaviours: str | None,
               fallback_chats: dict | None = None) -> dict:
    """:func:`crossdiff_core.steering.steer_crosscoder` -> ``out_dir`` (steering.json, tracking.parquet with a
    behaviour spec). ``settings``: params.yaml's ``steer`` section; ``behaviours``: the spec
    (:func:`behaviours_for`). Prompts: ``steer.prompts`` (a file), else the spec's, else the first user turns
    of ``fallback_chats`` (``{"chats": [...], "messages_column": ...}``)."""
    from crossdiff_core.errors import ConfigError
    from crossdiff_core.headlines import steering_headline
    from crossdiff_core.steering import SteerConfig, first_user_turns, steer_crosscoder

    cfg, out = SteerConfig.from_dict(settings), Path(out_dir)
    prompts = None
    if not cfg.prompts and behaviours is None:
        if not (fallback_chats and fallback_chats.get("chats")):
            raise ConfigError("steering needs prompts: set steer.prompts or models.behaviours in params.yaml")
        n = {"n": cfg.max_prompts} if cfg.max_prompts else {}
        prompts = first_user_turns(fallback_chats["chats"], fallback_chats["messages_column"], **n)
    res, track = steer_crosscoder(crosscoder_dir, latents, prompts=prompts, behaviours=behaviours, cfg=cfg)
    if track is not None:
        atomic_write(out / TRACKING, lambda p: track.to_parquet(p, index=False))
    else:
        (out / TRACKING).unlink(missing_ok=True)  # the report attaches a tracking table only where one was made
    write_json(res, out / STEERING)
    return steering_headline(res)
