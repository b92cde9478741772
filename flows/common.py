"""What every stage flow shares: reading params.yaml (the profile switch, the section names), the artifact
layout, stage keys and the command line.

Light on purpose: a stage's import closure is its dvc.yaml code deps (tests/test_dvc_closure.py), so this
module imports no stage's code. Each flow reads the sections it uses with the config dataclasses of the
core modules it runs (``section(p, "train", TrainConfig)``); ``flows/sections.py`` maps every section to
its dataclass, for the whole-pipeline flow and the tests."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from crossdiff_core.config import from_dict, neutral
from crossdiff_core.errors import ConfigError

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"
# params.yaml's sections, in its order; flows/sections.py gives each its dataclass (tests/test_config.py
# checks that the two agree)
SECTION_NAMES = ("paths", "models", "locate", "data", "cache", "train", "analyze", "evaluate", "steer", "scoreboard",
                 "report", "tracking")


# ---- the sections every stage reads ------------------------------------------------------------------

@dataclass
class PathsConfig:
    """Artifact layout (params.yaml ``paths``); dvc.yaml reads these keys too: keep them the same in every profile."""

    models: str = "artifacts/models"  # the pair (pair.json), the toy pair and its data
    locate: str = "artifacts/locate"  # the layer sweep: locate.json, locate.png, recommended.json
    cache: str = "artifacts/cache"  # the activation cache
    crosscoders: str = "artifacts/crosscoders"  # one crosscoder directory per kind
    analysis: str = "artifacts/analysis"  # latents.parquet, summary and plots per kind
    evaluate: str = "artifacts/evaluate"  # the KL gap per kind
    steer: str = "artifacts/steer"  # steering results per kind
    scoreboard: str = "artifacts/scoreboard"  # every method scored against the behaviours, and the lens it scored
    report: str = "artifacts/report"  # the HTML report, its figures and numbers
    metrics: str = "metrics"  # DVC metrics: one JSON per stage


@dataclass
class TrackingConfig:
    """MLflow (params.yaml ``tracking``)."""

    experiment: str = neutral("crossdiff")  # MLflow experiment of the runs


def section(params: dict[str, Any], name: str, cls: type[T]) -> T:
    """The ``name`` section of ``params`` read strictly into ``cls``, the caller's config dataclass (an
    unknown key is a ConfigError naming the valid ones)."""
    return from_dict(cls, params[name], section=name)


def load_params(path: str = DEFAULT_PARAMS) -> dict[str, Any]:
    """The settings in ``path``; when it names another file in ``params_file`` (the profile switch,
    ``dvc exp run -S params_file=params-paper.yaml``), that file's settings.

    Checks the section names and reads ``paths`` and ``tracking`` strictly; each stage reads its own
    sections strictly (:func:`section`) before it starts work, and ``flows.pipeline`` reads them all."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist: run from the repository root, or pass --params FILE")
    params = yaml.safe_load(p.read_text()) or {}
    target = params.get("params_file")
    if target and Path(target).resolve() != p.resolve():
        if not Path(target).is_file():
            raise ConfigError(f"{p} switches to params_file {target}, which does not exist: fix params_file")
        params = yaml.safe_load(Path(target).read_text()) or {}
        params["params_file"] = str(target)
    else:
        params["params_file"] = str(path)
    missing = [s for s in SECTION_NAMES if s not in params]
    if missing:
        raise ConfigError(f"{params['params_file']} lacks the sections {missing}: copy them from params.yaml")
    unknown = sorted(set(params) - set(SECTION_NAMES) - {"params_file"})
    if unknown:
        raise ConfigError(f"{params['params_file']} has unknown sections {unknown}; the sections are "
                          f"{['params_file', *SECTION_NAMES]}: fix the spelling")
    section(params, "paths", PathsConfig)
    section(params, "tracking", TrackingConfig)
    return params


class Layout:
    """Artifact paths, from ``params["paths"]`` (dvc.yaml reads the same keys)."""

    def __init__(self, params: dict):
        self.p = {k: Path(v) for k, v in params["paths"].items()}

    def __getattr__(self, name: str) -> Path:
        try:
            return self.p[name]
        except KeyError:
            raise AttributeError(name) from None

    def crosscoder(self, kind: str) -> Path:
        return self.p["crosscoders"] / kind

    def analysis(self, kind: str) -> Path:
        return self.p["analysis"] / kind

    def metric(self, name: str) -> Path:
        return self.p["metrics"] / f"{name}.json"


def stage_key(*parts: Any) -> str:
    """A digest of the settings and inputs a stage's output depends on (see tasks.io.prepare_out)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cli(flow: Callable, description: str, *, kind: bool = False, argv: list[str] | None = None) -> Any:
    """``python -m flows.<stage> [--params FILE] [--kind KIND]``: run ``flow`` and print its result."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default=DEFAULT_PARAMS, help="settings file (default params.yaml)")
    if kind:
        ap.add_argument("--kind", required=True, help="crosscoder kind: l1 or batchtopk")
    a = ap.parse_args(argv)
    kw = {"params_file": a.params}
    if kind:
        kw["kind"] = a.kind
    result = flow(**kw)
    print(json.dumps(result, indent=2, default=str))
    return result
