"""Crosscoder training: in this process, or data-parallel over ``nproc`` processes with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE


# a retry resumes from the last checkpoint
@task(name="train-crosscoder", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def train_crosscoder_task(cache_dir: str, out_dir: str, kind: str, train: dict, run=None) -> dict:
    """Train (or resume) the ``kind`` crosscoder of ``train`` (a TrainConfig as a dict) into ``out_dir``;
    training curves go to ``run`` (a StageRun). ``train.nproc > 1``: data-parallel with torchrun."""
    from crossdiff_core.trainer import TrainConfig, train_crosscoder

    tc = TrainConfig.from_dict(train)
    if tc.nproc <= 1:
        return train_crosscoder(cache_dir, out_dir, kind=kind, train=tc,
                                on_metrics=run.metrics_callback() if run else None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tc.nproc}",
           "-m", "crossdiff_core.distributed", "--cache", str(cache_dir), "--out", str(out_dir),
           "--config", json.dumps({"kind": kind, "train": train})]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if run is not None:  # the curves, from rank 0's history
        for m in json.loads((Path(out_dir) / "history.json").read_text()):
            run.log_metrics(m, step=int(m["step"]))
    return json.loads((Path(out_dir) / "metrics.json").read_text())
