"""Steering with a crosscoder's latents, and (for a pair with planted behaviours) which latents track them."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json

STEERING = "steering.json"
TRACKING = "tracking.parquet"


def first_user_turns(chats: list, messages_column: str = "messages", n: int = 200) -> list[dict]:
    """Prompts from chat data: the first user message of each of the first ``n`` conversations."""
    from crossdiff_core.data import load_source

    out: list[dict] = []
    for spec in chats:
        for msgs in load_source(spec).select_columns([messages_column])[messages_column]:
            user = next((m["content"] for m in msgs or [] if m.get("role") == "user"), None)
            if user:
                out.append({"text": user, "expected": None})
            if len(out) >= n:
                return out
    return out


@task(name="steer", cache_policy=NONE)
def steer_task(crosscoder_dir: str, latents: str, out_dir: str, settings: dict, ground_truth: str | None,
               fallback_chats: dict | None = None) -> dict:
    """Behaviour tracking (with a ground truth), the latent choice and the steering sweep -> ``out_dir``.
    Prompts: ``settings["prompts"]`` (a file), else the ground truth's, else the first user turns of
    ``fallback_chats`` (``{"chats": [...], "messages_column": ...}``)."""
    import pandas as pd

    from crossdiff_core.crosscoder import CrossCoder
    from crossdiff_core.errors import ConfigError
    from crossdiff_core.kl_eval import pair_for
    from crossdiff_core.steering import (SteerConfig, behaviour_tracking, read_prompts, refusal_effects, run_steering,
                                         select_latents, subsample_prompts)

    s, out = settings, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = CrossCoder.load(crosscoder_dir, device=s.get("device", "cpu"))
    pair = pair_for(cc, dtype=s.get("dtype", "float32"), device=s.get("device", "cpu"))
    table = pd.read_parquet(latents)
    gt = None
    if ground_truth:
        from crossdiff_core.toy_models import load_ground_truth

        gt = load_ground_truth(ground_truth)
    if s.get("prompts"):
        prompts = read_prompts(s["prompts"])
    elif gt is not None:
        prompts = list(gt["eval_prompts"])
    elif fallback_chats and fallback_chats.get("chats"):
        prompts = first_user_turns(fallback_chats["chats"], fallback_chats.get("messages_column", "messages"),
                                   int(s.get("max_prompts") or 200))
    else:
        raise ConfigError("steering needs prompts: set steer.prompts in params.yaml (a .txt/.jsonl file)")
    prompts = subsample_prompts(prompts, s.get("max_prompts"), int(s.get("seed", 0)))
    track = None
    if gt is not None:
        track = behaviour_tracking(pair, cc, gt, prompts, batch_size=int(s.get("batch_size", 64)))
        track.to_parquet(out / TRACKING, index=False)
    chosen = list(s.get("latents") or select_latents(table, n_top=int(s.get("n_top", 8)), n_shared=int(s.get("n_shared", 2)),
                                                     tracking=track, n_tracking=int(s.get("n_tracking", 4)),
                                                     seed=int(s.get("seed", 0))))
    cfg = SteerConfig(alphas=tuple(s.get("alphas", (-0.5, 0.5, 1.0, 1.5))), max_new_tokens=int(s.get("max_new_tokens", 20)),
                      batch_size=int(s.get("batch_size", 64)), progress=bool(s.get("progress", False)))
    res = run_steering(pair, cc, table, chosen, prompts, cfg, ground_truth=gt)
    res["inputs"] = {"crosscoder": crosscoder_dir, "latents": latents, "ground_truth": ground_truth,
                     "models": {"base": pair.base_name, "chat": pair.chat_name}, "layer": pair.layer}
    write_json(res, out / STEERING)
    numbers = {"latents": len(chosen), "seconds": res.get("seconds")}
    if res.get("has_ground_truth"):
        eff = refusal_effects(res)
        if len(eff):
            best = eff.sort_values("rise", ascending=False).iloc[0]
            numbers.update(base_refusal_best_rate=float(best["trigger_rate"]),
                           base_refusal_unsteered=float(best["trigger_rate_unsteered"]))
    return numbers
