"""Causal evaluation (the KL gap) of a crosscoder's latent sets on held-out chat conversations."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json


@task(name="kl-gap", cache_policy=NONE)
def kl_gap_task(crosscoder_dir: str, latents: str, out: str, settings: dict) -> dict:
    """KL(p_chat || p_S) and the share of the gap closed per patch set and token group -> ``out`` (JSON)."""
    import pandas as pd

    from crossdiff_core.crosscoder import CrossCoder
    from crossdiff_core.data import DataConfig, build_corpus
    from crossdiff_core.kl_eval import KLConfig, default_sets, kl_gap, pair_for

    s = settings
    cc = CrossCoder.load(crosscoder_dir, device=s.get("device", "cpu"))
    pair = pair_for(cc, dtype=s.get("dtype", "float32"), device=s.get("device", "cpu"))
    table = pd.read_parquet(latents)
    data = DataConfig(chats=list(s["chats"]), n_tokens=int(s["tokens"]), max_length=int(s["max_length"]),
                      seed=int(s.get("seed", 0)), messages_column=s.get("messages_column", "messages"))
    seqs = build_corpus(pair.tokenizer, data).sequences
    res = kl_gap(pair, cc, seqs, default_sets(table, n_random=int(s.get("n_random", 5)), seed=int(s.get("seed", 0))),
                 KLConfig(batch_size=int(s.get("batch_size", 8)), progress=bool(s.get("progress", False))))
    d = res.to_dict()
    d["inputs"] = {"crosscoder": crosscoder_dir, "latents": latents, "layer": pair.layer, "data": data.to_dict(),
                   "models": {"base": pair.base_name, "chat": pair.chat_name}}
    write_json(d, out)
    return headline(d)


def headline(d: dict) -> dict:
    """Per token group: the mean share of the gap closed, and per (non-group) set its share."""
    out = {f"gap_closed_mean.{g}": v.get("gap_closed_mean") for g, v in d.get("groups", {}).items()}
    for r in d.get("sets", []):
        if not r.get("group") and isinstance(r.get("gap_closed"), dict):
            out.update({f"gap_closed.{r['name']}.{g}": v for g, v in r["gap_closed"].items()})
    return out
