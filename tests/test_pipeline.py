"""The pipeline end to end on a micro configuration, through DVC as a user runs it.

In a scratch git+DVC copy of the repository:
1. ``dvc repro`` in Prefect's ephemeral mode, killed (SIGKILL to its process group) while the cache
   stage writes shards;
2. ``dvc repro`` against a Prefect server: the cache resumes; killed after the first BatchTopK training
   checkpoint;
3. the same again: training resumes; only train@batchtopk and what follows it ran;
4. ``dvc repro``: nothing runs; ``dvc status`` after a crosscoder kind's own knob is changed names only
   that kind's training stage;
5. ``dvc exp run -S report.cards.n_contexts=3``: only the report stage runs.
Then the outputs, DVC metrics and the MLflow records (parent/child runs, lineage tags checked against
dvc.lock, the manifest bytes and git) are checked, and the resumed crosscoder against one trained
without interruption. Each stage runs to completion once (a stage is a process that imports torch,
Prefect and MLflow: most of this test's time), the report twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.prefect_server import PrefectServer, base_env

REPO = Path(__file__).resolve().parents[1]
COPY = ("crossdiff_core", "flows", "tasks", "dvc.yaml", "params.yaml", "params-paper.yaml", "prefect.yaml", ".dvcignore")
GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
          "GIT_COMMITTER_EMAIL": "test@example.com"}
STAGES = {"toy_models", "locate", "cache", "train@l1", "train@batchtopk", "analyze@l1", "analyze@batchtopk", "evaluate@l1",
          "evaluate@batchtopk", "steer@l1", "steer@batchtopk", "scoreboard", "report"}
BEFORE_CACHE = {"toy_models", "locate"}  # done before the first run is killed in the cache stage
BEFORE_TRAIN_KILL = {"cache", "train@l1"}  # done before the second run is killed in train@batchtopk

# a toy pair that builds in seconds (the planted behaviours are not learnt at this size)
MICRO_TOY = dict(vocab_size=320, tokenizer_chars=40_000, hidden_size=32, num_layers=2, num_heads=2,
                 intermediate_size=64, max_seq_len=128, text_max_chars=150_000, chat_max_conversations=300,
                 heldout_fraction=0.2, pretrain_steps=3, pretrain_batch_size=4, pretrain_seq_len=64,
                 finetune_steps=3, finetune_batch_size=4, anchor_blocks=1, warmup_steps=1, eval_prompts_per_behaviour=5,
                 eval_other_prompts=10, eval_max_new_tokens=6)


def micro(params: dict) -> dict:
    params["models"]["toy"] = MICRO_TOY
    params["models"]["corpus"] = {"text_chars": 100_000, "conversations": 150, "eval_conversations": 30, "seed": 0}
    params["data"].update(n_tokens=6000, max_length=64)
    params["locate"].update(n_tokens=400, max_length=64)
    params["cache"].update(layer=1, shard_tokens=1024, batch_size=16)
    params["train"]["crosscoder"].update(dict_size=128, k=4, l1_coeff=1.0)
    params["train"].update(tokens=64 * 60, batch_size=64, lr=3e-3, val_every=20, checkpoint_every=10, dead_tokens=640,
                           val_tokens=512)
    params["analyze"].update(batch_size=1024)
    params["evaluate"].update(tokens=1500, max_length=64, n_random=2)
    params["steer"].update(max_prompts=12, max_new_tokens=4, n_top=2, n_tracking=1, n_shared=1, alphas=[0.5, 1.0],
                           batch_size=16)
    params["scoreboard"].update(n_directions=3, alphas=[1.0], max_prompts=12, max_new_tokens=4, lens_sequences=30)
    params["report"]["cards"].update(n_contexts=2, n_shared=2, max_chat_only=4, batch_size=1024)
    return params


def run(cmd: list[str], ws: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=1800, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def run_until(cmd: list[str], ws: Path, env: dict, pattern: str, log: Path) -> None:
    """Run ``cmd`` and SIGKILL its whole process group as soon as a file matching ``pattern`` appears."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if any(ws.glob(pattern)):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    pytest.fail(f"{cmd} ended before {pattern} appeared:\n{log.read_text()[-4000:]}")


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


# ---- fast checks of the configuration plumbing ---------------------------------------------------

def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("toy", "corpus"):  # sections a profile may leave at their defaults
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_paper_profile_has_every_knob_and_the_paper_values():
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = yaml.safe_load((REPO / "params-paper.yaml").read_text())
    assert _keys(default) == _keys(paper)  # DVC reads the same keys from either
    assert default["paths"] == paper["paths"]  # dvc.yaml takes the paths from params.yaml
    assert (paper["models"]["base"], paper["models"]["chat"]) == ("google/gemma-2-2b", "google/gemma-2-2b-it")
    assert paper["cache"]["layer"] == 13 and paper["data"]["n_tokens"] == 100_000_000
    cc = paper["train"]["crosscoder"]
    assert (cc["dict_size"], cc["k"], cc["l1_coeff"]) == (73_728, 100, 0.041)
    assert default["params_file"] == "params.yaml" and paper["params_file"] == "params-paper.yaml"


def test_load_params_follows_the_profile_switch(tmp_path, monkeypatch):
    from flows.common import load_params

    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
    other = dict(base, params_file="other.yaml", train=dict(base["train"], crosscoder={"k": 77}))
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert load_params("params.yaml")["train"]["crosscoder"]["k"] == base["train"]["crosscoder"]["k"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(base, params_file="other.yaml")))  # dvc exp run -S
    got = load_params("params.yaml")
    assert got["train"]["crosscoder"]["k"] == 77 and got["params_file"] == "other.yaml"


def test_prepare_out_resumes_only_what_the_same_settings_wrote(tmp_path):
    from tasks.io import prepare_out

    out = tmp_path / "out"
    assert prepare_out(out, "a") is False
    (out / "checkpoint.json").write_text("partial")
    assert prepare_out(out, "a") is True and (out / "checkpoint.json").exists()  # a re-run resumes
    assert prepare_out(out, "b") is False and not (out / "checkpoint.json").exists()  # other settings: fresh


# ---- the pipeline through DVC ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    ws = root / "repo"
    ws.mkdir()
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, ws / name)
    params = micro(yaml.safe_load((REPO / "params.yaml").read_text()))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / ".gitignore").write_text("/artifacts/\n/mlruns/\nmlflow.db\n")
    server = PrefectServer(root)
    try:
        env = {**base_env(root / "prefect-ephemeral"), **GIT_ID, "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)  # the default: sqlite:///mlflow.db in the repository
        senv = {**server.env(), **GIT_ID, "OMP_NUM_THREADS": "1"}
        senv.pop("MLFLOW_TRACKING_URI", None)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "micro pipeline"]):
            run(cmd, ws, env)
        logs = {}
        # 1: ephemeral Prefect; killed once the cache stage has written a shard
        run_until(["dvc", "repro"], ws, env, "artifacts/cache/shards/shard-*.json", root / "repro1.log")
        # 2 and 3: against the server; the cache resumes; killed after the first BatchTopK checkpoint, then
        # training resumes. (Not `dvc exp run`: it checks the workspace out first, which deletes outputs
        # that dvc.lock does not yet record, such as a killed run's partial cache.)
        run_until(["dvc", "repro"], ws, senv, "artifacts/crosscoders/batchtopk/checkpoint.json", root / "repro2.log")
        logs["repro2"] = (root / "repro2.log").read_text()
        logs["repro3"] = run(["dvc", "repro"], ws, senv).stdout
        run(["git", "add", "-A"], ws, senv)
        run(["git", "commit", "-qm", "outputs"], ws, senv)
        # 4: nothing to do; a kind's own knob changes only that kind's training stage
        logs["repro4"] = run(["dvc", "repro"], ws, senv).stdout
        logs["status"] = run(["dvc", "status"], ws, senv).stdout
        logs["knobs"] = {}
        text = (ws / "params.yaml").read_text()
        for knob, value in (("k", 8), ("l1_coeff", 2.0)):
            changed = yaml.safe_load(text)
            changed["train"]["crosscoder"][knob] = value
            (ws / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
            logs["knobs"][knob] = json.loads(run(["dvc", "status", "--json"], ws, senv).stdout)
        (ws / "params.yaml").write_text(text)
        # 5: an experiment on a report setting
        logs["exp"] = run(["dvc", "exp", "run", "-S", "report.cards.n_contexts=3"], ws, senv).stdout
        logs["metrics"] = run(["dvc", "metrics", "show", "--json"], ws, senv).stdout
        yield {"ws": ws, "params": params, "logs": logs, "env": senv}
    finally:
        server.stop()


@pytest.mark.e2e  # `make test-fast` leaves it out
def test_pipeline_completes_with_report_and_metrics(pipeline):
    ws, logs = pipeline["ws"], pipeline["logs"]
    # the models and the layer sweep were made before the first kill, the cache and train@l1 before the second
    assert ran(logs["repro2"]) == BEFORE_TRAIN_KILL | {"train@batchtopk"}
    assert ran(logs["exp"]) == {"report"}  # the experiment reran only what its setting changes
    assert "Stage 'train@batchtopk' didn't change" in logs["exp"]
    assert (ws / "artifacts/report/report.html").stat().st_size > 1000
    for kind in ("l1", "batchtopk"):
        assert (ws / f"artifacts/analysis/{kind}/latents.parquet").is_file()
        assert (ws / f"artifacts/evaluate/{kind}/kl.json").is_file()
        assert (ws / f"artifacts/steer/{kind}/steering.json").is_file()
    shown = json.loads(logs["metrics"])
    metrics = next(iter(shown.values()))["data"]
    assert {"metrics/train_l1.json", "metrics/train_batchtopk.json", "metrics/cache.json", "metrics/report.json",
            "metrics/locate.json", "metrics/scoreboard.json"} <= set(metrics)
    board = metrics["metrics/scoreboard.json"]["data"]  # every method, the same numbers for each
    assert set(board) == {f"{k}_{r}{c}" for k in ("l1", "batchtopk") for r in ("dnorm", "nu") for c in ("", "_codes")} \
        | {f"{k}_track" for k in ("l1", "batchtopk")} | {"lens", "random"}
    for m in board.values():
        assert 0 <= m["refusal"]["auroc"] <= 1 and {"steer_base", "steer_chat"} <= set(m["refusal"])
    assert '<h2 id="scoreboard">Scoreboard</h2>' in (ws / "artifacts/report/report.html").read_text()
    assert (ws / "artifacts/scoreboard/lens.safetensors").is_file()
    assert metrics["metrics/locate.json"]["data"]["recommended_layer"] == 0  # two blocks: block 0 is the candidate
    assert (ws / "artifacts/locate/locate.png").is_file()
    assert metrics["metrics/train_batchtopk.json"]["data"]["k"] == pipeline["params"]["train"]["crosscoder"]["k"]
    assert metrics["metrics/report.json"]["data"]  # the experiment's report
    assert 0 < metrics["metrics/train_l1.json"]["data"]["fve_chat"] <= 1


@pytest.mark.e2e  # `make test-fast` leaves it out
def test_second_repro_does_nothing(pipeline):
    assert ran(pipeline["logs"]["repro4"]) == set()
    assert "up to date" in pipeline["logs"]["status"]


def _params_changed(status: dict) -> set[str]:
    return {stage for stage, changes in status.items()
            if any("params.yaml" in c.get("changed deps", {}) for c in changes if isinstance(c, dict))}


@pytest.mark.e2e  # `make test-fast` leaves it out
def test_a_kinds_knob_changes_only_that_kinds_training(pipeline):
    knobs = pipeline["logs"]["knobs"]
    assert _params_changed(knobs["k"]) == {"train@batchtopk"}
    assert _params_changed(knobs["l1_coeff"]) == {"train@l1"}


@pytest.mark.e2e  # `make test-fast` leaves it out
def test_killed_cache_resumed_without_loss(pipeline):
    from crossdiff_core.cache import ActivationCache

    ws = pipeline["ws"]
    m = json.loads((ws / "metrics/cache.json").read_text())
    assert m["resumed"] is True and 0 < m["shards_computed"] < m["shards"]  # only the missing shards
    cache = ActivationCache(ws / "artifacts/cache", verify="full")  # every shard's checksum holds
    assert cache.n_tokens == pipeline["params"]["data"]["n_tokens"]
    assert cache.tokens().num_rows == cache.n_tokens


@pytest.mark.e2e  # `make test-fast` leaves it out
def test_training_knob_reruns_only_training_and_what_follows_and_resumes(pipeline, tmp_path):
    from crossdiff_core.trainer import TrainConfig, train_crosscoder

    ws, logs = pipeline["ws"], pipeline["logs"]
    assert ran(logs["repro3"]) == STAGES - BEFORE_CACHE - BEFORE_TRAIN_KILL  # train@batchtopk resumed, the rest
    assert "Stage 'train@l1' didn't change" in logs["repro3"] and "Stage 'cache' didn't change" in logs["repro3"]
    # the resumed crosscoder is the one an uninterrupted run trains
    t = pipeline["params"]["train"]
    train_crosscoder(ws / "artifacts/cache", tmp_path / "ref", kind="batchtopk", train=TrainConfig.for_kind(t, "batchtopk"))
    got = load_file(ws / "artifacts/crosscoders/batchtopk/model.safetensors")
    want = load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list((ws / "artifacts/crosscoders/batchtopk").glob("checkpoint*"))  # dropped once complete
    steps = [h["step"] for h in json.loads((ws / "artifacts/crosscoders/batchtopk/history.json").read_text())]
    assert steps == [20, 40, 60]  # validations from before the kill and after it


def _lock_md5(ws: Path, path: str) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return out["md5"]
    raise KeyError(path)


@pytest.mark.e2e  # `make test-fast` leaves it out
@pytest.mark.filterwarnings("ignore:.*noload.*")  # SQLAlchemy 2.1 inside MLflow's store
def test_mlflow_runs_and_lineage(pipeline):
    import mlflow
    from mlflow import MlflowClient

    ws = pipeline["ws"]
    c = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = c.get_experiment_by_name("crossdiff")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if r.data.tags.get("crossdiff.kind") == "pipeline"]
    assert len(parents) == 4  # one per dvc invocation that ran a stage (the no-op ran none)
    children = {}
    for r in runs:
        if r.data.tags.get("crossdiff.kind") == "stage" and r.info.status == "FINISHED":
            children.setdefault(r.data.tags["dvc.stage"], []).append(r)
    assert set(children) == STAGES
    methods = {r.data.tags.get("crossdiff.method") for r in children["scoreboard"]} - {None}  # a run per method
    assert {"l1_dnorm", "batchtopk_nu", "batchtopk_nu_codes", "lens", "random"} <= methods
    # the stages of one dvc invocation share one parent
    repro2 = {r.data.tags["mlflow.parentRunId"] for s in BEFORE_TRAIN_KILL for r in children[s]}
    repro3 = {r.data.tags["mlflow.parentRunId"] for s in STAGES - BEFORE_CACHE - BEFORE_TRAIN_KILL - {"report"}
              for r in children[s]}
    assert len(repro2) == len(repro3) == 1 and repro2 != repro3
    assert len(children["report"]) == 2  # the pipeline's and the experiment's

    commit = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=ws, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    manifest_sha = hashlib.sha256((ws / "artifacts/cache/manifest.json").read_bytes()).hexdigest()
    pair = json.loads((ws / "artifacts/models/pair.json").read_text())

    an = max(children["analyze@batchtopk"], key=lambda r: r.info.start_time)
    tags = an.data.tags
    assert tags["lineage.git_commit"] in (commit, head)
    assert tags["lineage.input.cache.dvc_md5"] == _lock_md5(ws, "artifacts/cache")
    assert tags["lineage.input.crosscoder.dvc_md5"] == _lock_md5(ws, "artifacts/crosscoders/batchtopk")
    assert tags["lineage.output.analysis.dvc_md5"] == _lock_md5(ws, "artifacts/analysis/batchtopk")
    assert tags["lineage.cache.manifest_sha256"] == manifest_sha
    assert (tags["lineage.models.base"], tags["lineage.models.chat"]) == (pair["base"], pair["chat"])
    # from the latent table back to the run that trained the crosscoder, and from there to the cache's run
    train = by_id[tags["lineage.input.crosscoder.run_id"]]
    assert train.data.tags["dvc.stage"] == "train@batchtopk" and train.data.params["crosscoder.k"] == str(
        pipeline["params"]["train"]["crosscoder"]["k"])
    cache_run = by_id[train.data.tags["lineage.input.cache.run_id"]]
    assert cache_run.data.tags["dvc.stage"] == "cache"
    sources = {d.dataset.name for d in cache_run.inputs.dataset_inputs}
    assert {"text:text.parquet", "chat:chats.jsonl", "models"} <= sources
    # artifacts and the training curves
    assert {"latents.parquet", "latents.summary.json"} <= {Path(a.path).name for a in c.list_artifacts(an.info.run_id, "analysis")}
    assert "model.safetensors" in {Path(a.path).name for a in c.list_artifacts(train.info.run_id, "crosscoder")}
    curve = c.get_metric_history(train.info.run_id, "fve_chat")
    assert sorted(m.step for m in curve) == [20, 40, 60]
    assert mlflow.get_tracking_uri()  # the client library is usable in-process too
