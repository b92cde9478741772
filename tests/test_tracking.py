"""MLflow records without the pipeline: one parent run per DVC invocation (two stage processes of one
fake ``dvc repro``, a clock step between them), one parent when two stages race to create it, and an
experiment that MLflow 3's UI opens on its training runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import tracking

REPO = Path(__file__).resolve().parents[1]

# one stage process: joins this pipeline run's parent and prints it
STAGE = """
import os, sys
if os.environ.get("CLOCK_STEP"):  # the wall clock stepped since dvc started: psutil's create_time moves
    import psutil._pslinux as pl
    real = pl.boot_time
    pl.boot_time = lambda: real() + 1.0
from tasks import tracking
with tracking.stage_run(sys.argv[1], params={"stage": sys.argv[1]}, experiment="crossdiff-test",
                        full_params={"all": 1}) as run:
    print("PARENT", run.parent_id)
"""

# a stand-in for `dvc repro`: runs each stage's command through a shell, one after the other, as DVC does
FAKE_DVC = """
import shlex, subprocess, sys
for i, stage in enumerate(sys.argv[3:]):  # argv: repro STAGE_SCRIPT STAGE...
    env = None if i == 0 else {**__import__("os").environ, "CLOCK_STEP": "1"}
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(open(sys.argv[2]).read())} {stage}"
    subprocess.run(cmd, shell=True, check=True, env=env)
"""


@pytest.fixture
def uri(tmp_path, monkeypatch):
    u = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", u)
    for var in (tracking.PARENT_ENV, tracking.PIPELINE_ENV):
        monkeypatch.delenv(var, raising=False)
    return u


def _parents(c, exp_name: str) -> list:
    exp = c.get_experiment_by_name(exp_name)
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("crossdiff.kind") == "pipeline"]


def test_one_dvc_invocation_is_one_parent_run(tmp_path, uri):
    (tmp_path / "stage.py").write_text(STAGE)
    dvc = tmp_path / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text(FAKE_DVC)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    outs = []
    for stages in (["toy_models", "cache"], ["train"]):  # two invocations: `dvc repro`, then another
        p = subprocess.run([sys.executable, str(dvc), "repro", str(tmp_path / "stage.py"), *stages], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append([line.split()[1] for line in p.stdout.splitlines() if line.startswith("PARENT")])
    first, second = outs
    assert len(first) == 2 and first[0] == first[1]  # the stages of one dvc repro: one parent
    assert second[0] != first[0]  # another dvc invocation: another parent
    c = tracking.client()
    parents = _parents(c, "crossdiff-test")
    assert sorted(r.info.run_id for r in parents) == sorted({first[0], second[0]})
    assert all(r.data.tags["crossdiff.launcher"] == "dvc" for r in parents)
    exp = c.get_experiment_by_name("crossdiff-test").experiment_id
    kids = [r for r in c.search_runs([exp]) if r.data.tags.get("crossdiff.kind") == "stage"]
    assert {r.data.tags["crossdiff.stage"]: r.data.tags["mlflow.parentRunId"] for r in kids} == {
        "toy_models": first[0], "cache": first[0], "train": second[0]}


def test_racing_stages_share_the_earliest_parent(uri, monkeypatch):
    a = tracking.start_pipeline_run({"x": 1}, experiment="race", key="dvc:host:1:2", launcher="dvc")
    time.sleep(0.01)  # distinct start times: the earlier run wins
    real, calls = tracking._pipeline_runs, []

    def not_yet_visible(c, exp, key):  # this stage searched before the other one's parent existed
        calls.append(key)
        return [] if len(calls) == 1 else real(c, exp, key)

    monkeypatch.setattr(tracking, "_pipeline_runs", not_yet_visible)
    b = tracking.start_pipeline_run({"x": 1}, experiment="race", key="dvc:host:1:2", launcher="dvc")
    assert b == a and [r.info.run_id for r in _parents(tracking.client(), "race")] == [a]


def test_experiment_is_a_model_training_one(uri):
    c = tracking.client()
    exp = tracking.experiment_id(c, "fresh")
    assert c.get_experiment(exp).tags[tracking.KIND_TAG] == "custom_model_development"
    old = c.create_experiment("made-by-an-older-crossdiff")  # no kind: the UI would open the GenAI overview
    assert tracking.experiment_id(c, "made-by-an-older-crossdiff") == old
    assert c.get_experiment(old).tags[tracking.KIND_TAG] == "custom_model_development"
    chosen = c.create_experiment("chosen", tags={tracking.KIND_TAG: "genai_development"})
    tracking.experiment_id(c, "chosen")
    assert c.get_experiment(chosen).tags[tracking.KIND_TAG] == "genai_development"  # a user's choice stays
    url = tracking.experiment_url("http://127.0.0.1:5000/", "fresh")
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
