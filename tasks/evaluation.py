"""Causal evaluation (the KL gap) of a crosscoder's latent sets on held-out chat conversations."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json


@task(name="kl-gap", cache_policy=NONE)
def kl_gap_task(crosscoder_dir: str, latents: str, out: str, settings: dict) -> dict:
    """:func:`crossdiff_core.kl_eval.evaluate_crosscoder` -> ``out`` (JSON); returns its headline numbers."""
    from crossdiff_core.data import DataConfig
    from crossdiff_core.kl_eval import KLConfig, evaluate_crosscoder, headline

    s = settings
    data = DataConfig(chats=list(s["chats"]), n_tokens=int(s["tokens"]), max_length=int(s["max_length"]),
                      seed=int(s.get("seed", 0)), messages_column=s.get("messages_column", "messages"))
    d = evaluate_crosscoder(crosscoder_dir, latents, data, n_random=int(s.get("n_random", 5)), seed=int(s.get("seed", 0)),
                            cfg=KLConfig(batch_size=int(s.get("batch_size", 8)), progress=bool(s.get("progress", False))),
                            dtype=s.get("dtype", "float32"), device=s.get("device", "cpu"))
    write_json(d, out)
    return headline(d)
