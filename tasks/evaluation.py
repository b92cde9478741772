"""Causal evaluation (the KL gap) of a crosscoder's latent sets on held-out chat conversations."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json


@task(name="kl-gap", cache_policy=NONE)
def kl_gap_task(crosscoder_dir: str, latents: str, out: str, settings: dict) -> dict:
    """:func:`crossdiff_core.kl_eval.evaluate_crosscoder` -> ``out`` (JSON); returns its headline numbers."""
    from crossdiff_core.headlines import kl_headline
    from crossdiff_core.kl_eval import EvaluateConfig, evaluate_crosscoder

    d = evaluate_crosscoder(crosscoder_dir, latents, EvaluateConfig.from_dict(settings))
    write_json(d, out)
    return kl_headline(d)
