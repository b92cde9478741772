"""What every stage flow shares: reading params.yaml, the command line, the artifact layout."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossdiff_core.analysis import AnalysisConfig
from crossdiff_core.caching import CacheConfig
from crossdiff_core.cards import CardsConfig
from crossdiff_core.config import from_dict, neutral
from crossdiff_core.data import DataConfig
from crossdiff_core.errors import ConfigError
from crossdiff_core.kl_eval import EvaluateConfig
from crossdiff_core.report.page import TITLE
from crossdiff_core.steering import SteerConfig
from crossdiff_core.toy.config import CorpusConfig, ToyModelsConfig
from crossdiff_core.trainer import TrainConfig

DEFAULT_PARAMS = "params.yaml"
SOURCES = ("toy", "hub")


# ---- the pipeline's own sections (the others are the stages' core dataclasses) ----------------------

@dataclass
class PathsConfig:
    """Artifact layout (params.yaml ``paths``); dvc.yaml reads these keys too: keep them the same in every profile."""

    models: str = "artifacts/models"  # the pair (pair.json), the toy pair and its data
    cache: str = "artifacts/cache"  # the activation cache
    crosscoders: str = "artifacts/crosscoders"  # one crosscoder directory per kind
    analysis: str = "artifacts/analysis"  # latents.parquet, summary and plots per kind
    evaluate: str = "artifacts/evaluate"  # the KL gap per kind
    steer: str = "artifacts/steer"  # steering results per kind
    report: str = "artifacts/report"  # the HTML report, its figures and numbers
    metrics: str = "metrics"  # DVC metrics: one JSON per stage


@dataclass
class ModelsConfig:
    """The model pair (params.yaml ``models``): the embedded toy pair, or two hub models."""

    source: str = "toy"  # toy: build the embedded pair (crossdiff_core.toy); hub: use base/chat below
    base: str | None = None  # hub: model id or local directory
    chat: str | None = None  # hub: the fine-tuned model
    base_revision: str | None = None  # hub: pin a commit for an exactly repeatable run
    chat_revision: str | None = None
    toy: ToyModelsConfig = field(default_factory=ToyModelsConfig)  # the toy pair's build
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # the toy pair's cache and evaluation data

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"models.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "hub" and not (self.base and self.chat):
            raise ConfigError("models.source is hub: set models.base and models.chat (hub ids or local directories)")


@dataclass
class ReportConfig:
    """The report stage (params.yaml ``report``)."""

    title: str = TITLE  # page title
    cards: CardsConfig = field(default_factory=CardsConfig)  # the latent cards


@dataclass
class TrackingConfig:
    """MLflow (params.yaml ``tracking``)."""

    experiment: str = neutral("crossdiff")  # MLflow experiment of the runs


SECTIONS: dict[str, type] = {"paths": PathsConfig, "models": ModelsConfig, "data": DataConfig, "cache": CacheConfig,
                             "train": TrainConfig, "analyze": AnalysisConfig, "evaluate": EvaluateConfig,
                             "steer": SteerConfig, "report": ReportConfig, "tracking": TrackingConfig}


def section(params: dict[str, Any], name: str) -> Any:
    """The ``name`` section of ``params`` as its dataclass (read strictly)."""
    return from_dict(SECTIONS[name], params[name], section=name)


def load_params(path: str = DEFAULT_PARAMS) -> dict[str, Any]:
    """The settings in ``path``; when it names another file in ``params_file`` (the profile switch,
    ``dvc exp run -S params_file=params-paper.yaml``), that file's settings."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} does not exist: run from the repository root, or pass --params FILE")
    params = yaml.safe_load(p.read_text()) or {}
    target = params.get("params_file")
    if target and Path(target).resolve() != p.resolve():
        params = yaml.safe_load(Path(target).read_text()) or {}
        params["params_file"] = str(target)
    else:
        params["params_file"] = str(path)
    missing = [s for s in SECTIONS if s not in params]
    if missing:
        raise ConfigError(f"{params['params_file']} lacks the sections {missing}: copy them from params.yaml")
    unknown = sorted(set(params) - set(SECTIONS) - {"params_file"})
    if unknown:
        raise ConfigError(f"{params['params_file']} has unknown sections {unknown}; the sections are "
                          f"{['params_file', *SECTIONS]}: fix the spelling")
    for name in SECTIONS:  # a typo fails here, before any stage runs
        section(params, name)
    return params


def kinds(params: dict) -> list[str]:
    return list(section(params, "train").kinds)


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
