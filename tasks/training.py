"""Crosscoder training: in this process, or data-parallel over ``nproc`` processes with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

MODEL_KEYS = ("init_norm", "aux_k", "aux_alpha", "threshold_decay")  # CrossCoderConfig overrides


def split_settings(kind: str, train: dict) -> dict:
    """params.yaml's ``train`` section -> the arguments of ``train_crosscoder`` for ``kind``."""
    from crossdiff_core.trainer import TrainConfig

    tc = {k: v for k, v in train.items() if k in TrainConfig.__dataclass_fields__}
    return {"kind": kind, "dict_size": int(train["dict_size"]),
            "k": int(train["k"]) if kind == "batchtopk" else None,
            "l1_coeff": float(train["l1_coeff"]) if kind == "l1" else 0.0,
            "model_overrides": {k: train[k] for k in MODEL_KEYS if train.get(k) is not None},
            "train": tc}


# a retry resumes from the last checkpoint
@task(name="train-crosscoder", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def train_crosscoder_task(cache_dir: str, out_dir: str, settings: dict, nproc: int = 1, run=None) -> dict:
    """Train (or resume) the crosscoder into ``out_dir``; training curves go to ``run`` (a StageRun)."""
    from crossdiff_core.trainer import TrainConfig, train_crosscoder

    if nproc <= 1:
        s = dict(settings)
        tc = TrainConfig.from_dict(s.pop("train"))
        return train_crosscoder(cache_dir, out_dir, train=tc, on_metrics=run.metrics_callback() if run else None, **s)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "crossdiff_core.distributed", "--cache", str(cache_dir), "--out", str(out_dir),
           "--config", json.dumps(settings)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if run is not None:  # the curves, from rank 0's history
        for m in json.loads((Path(out_dir) / "history.json").read_text()):
            run.log_metrics(m, step=int(m["step"]))
    return json.loads((Path(out_dir) / "metrics.json").read_text())
