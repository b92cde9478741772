"""Stage 3, training: one crosscoder of ``--kind`` (l1 or batchtopk) on the cache, with its training
curves in MLflow. ``train.nproc > 1`` trains data-parallel with torchrun. Re-running after an
interruption resumes from the checkpoint; the checkpoint is dropped once training is complete.
``python -m flows.train --kind KIND [--params FILE]``"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from prefect import flow

from crossdiff_core.checkpoint import remove_checkpoint
from crossdiff_core.config import result_settings
from crossdiff_core.trainer import CHECKPOINT, TrainConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, stage_key
from tasks import tracking
from tasks.io import prepare_out, write_json
from tasks.training import train_crosscoder_task

OUTPUT_FILES = ("model.safetensors", "config.json", "metrics.json", "history.json")


@flow(name="crossdiff-train")
def train_flow(kind: str, params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L = Layout(p)
    tc = TrainConfig.for_kind(p["train"], kind)  # read strictly: a typo fails before any work
    settings = asdict(tc)
    out = L.crosscoder(kind)
    with tracking.stage_run(f"train-{kind}", params={"kind": kind, **settings},
                            full_params=p, params_file=p["params_file"], experiment=p["tracking"]["experiment"]) as run:
        run.log_input("cache", L.cache, context="training")
        lineage = run.log_cache_lineage(L.cache)
        kept = prepare_out(out, stage_key(kind, result_settings(TrainConfig, tc),
                                          lineage["lineage.cache.manifest_sha256"]))
        done = kept and (out / "metrics.json").is_file() and not (out / CHECKPOINT).exists()
        # DVC reruns a stage when its code changed: then train again; the pipeline flow skips finished work
        if done and "DVC_STAGE" not in os.environ:
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = train_crosscoder_task(str(L.cache), str(out), kind, settings, run)
        remove_checkpoint(out)  # complete: nothing to resume, and DVC need not keep it
        run.log_metrics(metrics, prefix="final.")
        run.log_output("crosscoder", out, artifact=False)
        for name in OUTPUT_FILES:
            run.log_artifact(out / name, "crosscoder")
        write_json(metrics, L.metric(f"train_{kind}"))
    return metrics


if __name__ == "__main__":
    cli(train_flow, __doc__, kind=True)
