"""MLflow records of the pipeline: a parent run per pipeline run, a child run per stage, and lineage.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` (artifacts under ``./mlruns``).

Which parent run a stage joins:
- ``CROSSDIFF_PARENT_RUN_ID``: that run (the pipeline flow sets it for its stages);
- ``CROSSDIFF_PIPELINE_ID``: the run tagged with that id (created by the first stage that asks);
- under ``dvc repro`` / ``dvc exp run``: one parent per DVC invocation (the dvc process's pid and its
  start in clock ticks since boot, which no clock step moves), so the stages one ``dvc repro`` runs
  are siblings; concurrent stages that both create it keep the earliest;
- otherwise the stage gets a parent of its own.

Lineage tags on every stage run (``lineage.*``): the git commit and whether the tree was dirty; for
each input and output artifact its path, its DVC hash (the md5 ``dvc.lock`` records; ``<md5>.dir`` for
a directory) and the id of the run that produced it; for an activation cache its manifest hash, layer,
models (names and revisions) and dataset sources (also logged as MLflow dataset inputs, so they show
in the run's Datasets panel). From a latent table one can so walk back to the exact crosscoder,
cache, models, data and code.

The experiment is tagged as a model-training one (``mlflow.experimentKind``), so MLflow 3's UI opens it
on its runs rather than on the GenAI overview. MLflow 3.17's UI also has a browser-wide switch
(sidebar: GenAI / Model training, or ``?workflowType=machine_learning`` in the URL):
:func:`experiment_url` gives a link that opens the runs either way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow's store

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402

from crossdiff_core.fileio import file_sha256  # noqa: E402

PARENT_ENV = "CROSSDIFF_PARENT_RUN_ID"
PIPELINE_ENV = "CROSSDIFF_PIPELINE_ID"
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "crossdiff"
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's experiment kind
_MAX_PARAM = 6000  # MLflow's limit on a param value


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def client() -> MlflowClient:
    return _client(tracking_uri())


@functools.lru_cache(maxsize=4)
def _client(uri: str) -> MlflowClient:  # one per process: opening a SQLite store checks its schema
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


# ---- code and artifact identity -------------------------------------------------------------------

def git_state(cwd: str | os.PathLike = ".") -> dict[str, str]:
    """``{"commit", "dirty", "branch"}`` of the git checkout at ``cwd`` (empty outside one)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):  # e.g. the worker image, built with GIT_COMMIT
        env = os.environ.get("CROSSDIFF_GIT_COMMIT")
        return {"commit": env, "dirty": "unknown"} if env else {}
    out = {"commit": commit}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
        out["branch"] = git("rev-parse", "--abbrev-ref", "HEAD")
    return out


@functools.lru_cache(maxsize=1)
def _dvc_repo(root: str):
    from dvc.repo import Repo

    return Repo(root)


def dvc_hash(path: str | os.PathLike) -> str | None:
    """The DVC md5 of a file or directory (``<md5>.dir`` for a directory), as ``dvc.lock`` records it;
    None outside a DVC repository."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build

    p = Path(path).resolve()
    if not p.exists():
        return None
    try:
        root = Repo.find_root(str(p if p.is_dir() else p.parent))
        repo = _dvc_repo(root)
        _, _, obj = build(repo.cache.local, str(p), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True)
    except NotDvcRepoError:
        return None
    except Exception as e:  # noqa: BLE001 - lineage must not fail a stage (e.g. a checkout without .git)
        warnings.warn(f"no DVC hash for {p}: {e}", stacklevel=2)
        return None
    return obj.hash_info.value


# ---- which pipeline run -----------------------------------------------------------------------------

def _start_stamp(proc) -> str:
    """When ``proc`` started, as something no clock step changes: Linux's start in clock ticks since
    boot (``/proc/<pid>/stat`` field 22). psutil's ``create_time()`` adds the boot time, which the
    kernel derives from the wall clock: an NTP or VM clock step between two stages moves it, and
    the stages of one ``dvc repro`` then found two parents. Elsewhere: that wall-clock time."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return f"{proc.create_time():.3f}"


def _dvc_ancestor() -> tuple[int, str] | None:
    """(pid, start stamp) of the ``dvc repro`` / ``dvc exp run`` process this stage runs under, if any."""
    import psutil

    with contextlib.suppress(psutil.Error):
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            argv = proc.cmdline()
            words = [Path(a).name for a in argv[:3]]
            if "dvc" in words and any(a in ("repro", "exp", "run") for a in argv):
                return proc.pid, _start_stamp(proc)
            proc = proc.parent()
    return None


def pipeline_key() -> tuple[str, str]:
    """(key that groups the stages of one pipeline run, what launched it)."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV], "env"
    dvc = _dvc_ancestor()
    if dvc is not None:
        return f"dvc:{socket.gethostname()}:{dvc[0]}:{dvc[1]}", "dvc"
    return f"proc:{socket.gethostname()}:{os.getpid()}:{time.time():.3f}", "manual"


def experiment_id(c: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if need be, tagged as model training (:data:`KIND_TAG`) unless
    someone chose its kind already."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={KIND_TAG: TRAINING_KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
            exp = c.get_experiment_by_name(name)
    if KIND_TAG not in exp.tags:  # an experiment an earlier crossdiff created
        c.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def experiment_url(ui: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """A link to ``experiment``'s runs in the MLflow UI at ``ui`` (e.g. ``http://127.0.0.1:5000``),
    in the model-training view whatever the browser's GenAI / Model training switch says."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id(client(), experiment)}/runs?workflowType=machine_learning"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def start_pipeline_run(params: Mapping[str, Any], *, experiment: str = DEFAULT_EXPERIMENT,
                       key: str | None = None, launcher: str | None = None, params_file: str | None = None) -> str:
    """The parent run of this pipeline run (found by its key, or created with the params and code state)."""
    c = client()
    exp = experiment_id(c, experiment)
    if key is None:
        key, launcher = pipeline_key()
    found = _pipeline_runs(c, exp, key)
    if found:
        return found[0].info.run_id
    git = git_state()
    tags = {"crossdiff.kind": "pipeline", "crossdiff.pipeline_key": key, "crossdiff.launcher": launcher or "",
            "mlflow.source.type": "PROJECT", "lineage.git_commit": git.get("commit", ""),
            "lineage.git_dirty": git.get("dirty", ""), "host": socket.gethostname()}
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = git["commit"]
    if params_file and Path(params_file).is_file():
        tags["lineage.params_file"] = str(params_file)
        tags["lineage.params_sha256"] = file_sha256(params_file)
    name = f"pipeline {_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"
    run = c.create_run(exp, run_name=name, tags=tags)
    first = _pipeline_runs(c, exp, key)[0].info.run_id
    if first != run.info.run_id:  # a concurrent stage of this pipeline run created one first: join it
        c.delete_run(run.info.run_id)
        return first
    c.log_batch(run.info.run_id, params=[Param(k, _param_value(v)) for k, v in flatten(params).items()])
    return run.info.run_id


def _pipeline_runs(c: MlflowClient, exp: str, key: str) -> list:
    """The parent runs keyed ``key``, earliest first (the run id breaks a tie, so racers agree)."""
    runs = c.search_runs([exp], filter_string=f"tags.`crossdiff.pipeline_key` = '{key}'", max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


# ---- a stage's run ----------------------------------------------------------------------------------

class StageRun:
    """One stage's child run: params, metrics over steps, artifacts and lineage (explicit run id, so it
    works from any thread a Prefect task runs in)."""

    def __init__(self, c: MlflowClient, run_id: str, parent_id: str):
        self.client, self.run_id, self.parent_id = c, run_id, parent_id

    # plain records
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, "" if v is None else str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        items = [Param(k, _param_value(v)) for k, v in flatten(params, prefix).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        now = int(time.time() * 1000)
        items = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def metrics_callback(self, prefix: str = ""):
        """``on_metrics(step, metrics)`` for the trainer: logs each validation as a point of the curves."""
        return lambda step, m: self.log_metrics(m, step=step, prefix=prefix)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    # lineage
    def _producer(self, md5: str) -> str | None:
        exp = self.client.get_run(self.run_id).info.experiment_id
        runs = self.client.search_runs([exp], filter_string=f"tags.`lineage.produced` LIKE '%{md5}%'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def log_input(self, role: str, path: str | os.PathLike, *, context: str = "input",
                  dataset: bool = True) -> str | None:
        """Record an input artifact: path, DVC hash, the run that produced it; and an MLflow dataset input."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        md5 = dvc_hash(path)
        tags = {f"lineage.input.{role}.path": str(path), f"lineage.input.{role}.dvc_md5": md5 or "unavailable"}
        producer = self._producer(md5) if md5 else None
        if producer:
            tags[f"lineage.input.{role}.run_id"] = producer
        self.set_tags(tags)
        if dataset:
            ds = MetaDataset(LocalArtifactDatasetSource(Path(path).resolve().as_uri()), name=role,
                             digest=(md5 or "")[:32] or None)
            self._log_dataset(ds, context, {"dvc_md5": md5 or "unavailable"})
        return md5

    def log_output(self, role: str, path: str | os.PathLike, *, artifact: bool = True,
                   artifact_path: str | None = None) -> str | None:
        """Record an output artifact (path and DVC hash) and, unless ``artifact=False``, upload it."""
        md5 = dvc_hash(path)
        produced = self.client.get_run(self.run_id).data.tags.get("lineage.produced", "")
        self.set_tags({f"lineage.output.{role}.path": str(path), f"lineage.output.{role}.dvc_md5": md5 or "unavailable",
                       "lineage.produced": " ".join(x for x in (produced, md5) if x)})
        if artifact:
            self.log_artifact(path, artifact_path or role)
        return md5

    def log_cache_lineage(self, cache_dir: str | os.PathLike) -> dict:
        """The activation cache's manifest hash, layer, models (names, revisions) and dataset sources."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import HTTPDatasetSource, LocalArtifactDatasetSource

        from crossdiff_core.runs import cache_manifest

        m, manifest_sha = cache_manifest(cache_dir)
        models = m.get("models", {})
        revs = models.get("revisions", {})
        tags = {"lineage.cache.manifest_sha256": manifest_sha,
                "lineage.cache.n_tokens": m.get("n_tokens"), "lineage.cache.layer": m.get("layer"),
                "lineage.cache.dtype": m.get("dtype"),
                "lineage.models.base": models.get("base"), "lineage.models.chat": models.get("chat"),
                "lineage.models.base_revision": revs.get("base"), "lineage.models.chat_revision": revs.get("chat"),
                "lineage.tokenizer_hash": m.get("tokenizer_hash"),
                "lineage.data.corpus_sha256": (m.get("data") or {}).get("corpus_sha256")}
        self.set_tags({k: v for k, v in tags.items() if v is not None})
        for i, src in enumerate((m.get("data") or {}).get("sources", [])):
            spec = src.get("source")
            spec = spec.get("path") if isinstance(spec, Mapping) else spec
            spec = str(spec)
            if Path(spec).exists():
                source = LocalArtifactDatasetSource(Path(spec).resolve().as_uri())
            else:  # a hub dataset name
                source = HTTPDatasetSource(f"https://huggingface.co/datasets/{spec}")
            name = f"{src.get('kind', 'data')}:{Path(spec).name}"
            digest = (src.get("fingerprint") or "")[:32] or None
            self._log_dataset(MetaDataset(source, name=name, digest=digest), "cache-data",
                              {"kind": str(src.get("kind")), "rows": str(src.get("rows")), "source": spec})
        return tags

    def _log_dataset(self, ds, context: str, tags: Mapping[str, str]) -> None:
        tag_list = [InputTag("mlflow.data.context", context)] + [InputTag(k, str(v)) for k, v in tags.items()]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=tag_list)])


@contextlib.contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any], experiment: str = DEFAULT_EXPERIMENT,
              run_name: str | None = None, full_params: Mapping[str, Any] | None = None,
              params_file: str | None = None) -> Iterator[StageRun]:
    """A child run for ``stage`` under this pipeline run's parent; ends FINISHED, or FAILED on error.

    ``params``: this stage's settings (logged as params); ``full_params``: every setting, logged on the
    parent when this stage creates it."""
    c = client()
    parent = os.environ.get(PARENT_ENV) or start_pipeline_run(full_params or params, experiment=experiment,
                                                              params_file=params_file)
    exp = c.get_run(parent).info.experiment_id
    git = git_state()
    tags = {"mlflow.parentRunId": parent, "crossdiff.kind": "stage", "crossdiff.stage": stage,
            "lineage.git_commit": git.get("commit", ""), "lineage.git_dirty": git.get("dirty", ""),
            "host": socket.gethostname(), "dvc.stage": os.environ.get("DVC_STAGE", "")}
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = git["commit"]
    run = c.create_run(exp, run_name=run_name or stage, tags=tags)
    sr = StageRun(c, run.info.run_id, parent)
    sr.log_params(params)
    c.update_run(parent, status="RUNNING")
    try:
        yield sr
    except BaseException:
        c.set_terminated(sr.run_id, status="FAILED")
        c.set_terminated(parent, status="FAILED")
        raise
    c.set_terminated(sr.run_id, status="FINISHED")
    c.set_terminated(parent, status="FINISHED")
