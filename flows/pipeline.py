"""The whole pipeline as one Prefect flow: models, the layer sweep (locate), cache, then per crosscoder kind
training, analysis, evaluation and steering, then the scoreboard and the report; one MLflow parent run with a child run per stage.

Each stage resumes or skips what is already done (complete toy build, complete cache shards, training
checkpoints); ``dvc repro`` is the way to rerun exactly what changed. ``python -m flows.pipeline
[--params FILE]`` (e.g. ``--params params-paper.yaml``)."""

from __future__ import annotations

import os

from prefect import flow
from prefect.runtime import flow_run

from flows.analyze import analyze_flow
from flows.cache import cache_flow
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params
from flows.evaluate import evaluate_flow
from flows.locate import locate_flow
from flows.report import report_flow
from flows.scoreboard import scoreboard_flow
from flows.sections import read_all
from flows.steer import steer_flow
from flows.toy_models import toy_models_flow
from flows.train import train_flow
from tasks import tracking


@flow(name="crossdiff-pipeline")
def pipeline_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    cfg = read_all(p)  # every section, strictly: a typo anywhere fails before the first stage
    parent = tracking.start_pipeline_run(p, experiment=p["tracking"]["experiment"], key=f"prefect:{flow_run.id}",
                                         launcher="prefect", params_file=p["params_file"])
    before = os.environ.get(tracking.PARENT_ENV)
    os.environ[tracking.PARENT_ENV] = parent  # the stage flows below join this run
    try:
        toy_models_flow(params_file)
        locate_flow(params_file)
        cache_flow(params_file)
        for kind in cfg["train"].kinds:
            train_flow(kind, params_file)
            analyze_flow(kind, params_file)
            evaluate_flow(kind, params_file)
            steer_flow(kind, params_file)
        scoreboard_flow(params_file)
        report = report_flow(params_file)
    finally:
        if before is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = before
    return {"report": report["report"], "mlflow_parent_run": parent, "metrics": str(Layout(p).metrics)}


if __name__ == "__main__":
    cli(pipeline_flow, __doc__)
