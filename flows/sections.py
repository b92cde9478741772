"""Every params.yaml section and its settings dataclass, for what reads them all: the whole-pipeline flow
(``flows.pipeline`` reads every section strictly before any stage runs) and the tests.

No DVC stage imports this module: it imports every stage's code, and a stage's imports are its dvc.yaml
code deps (tests/test_dvc_closure.py). A stage flow reads only its own sections, with the dataclasses
of the core modules it runs (``flows.common.section``)."""

from __future__ import annotations

from typing import Any

from crossdiff_core.analysis import AnalysisConfig
from crossdiff_core.caching import CacheConfig
from crossdiff_core.data import DataConfig
from crossdiff_core.kl_eval import EvaluateConfig
from crossdiff_core.locate import LocateConfig
from crossdiff_core.scoreboard import ScoreboardConfig
from crossdiff_core.steering import SteerConfig
from crossdiff_core.trainer import TrainConfig
from flows.common import PathsConfig, TrackingConfig, section
from flows.report import ReportConfig
from flows.toy_models import ModelsConfig

SECTIONS: dict[str, type] = {"paths": PathsConfig, "models": ModelsConfig, "locate": LocateConfig, "data": DataConfig,
                             "cache": CacheConfig, "train": TrainConfig, "analyze": AnalysisConfig,
                             "evaluate": EvaluateConfig, "steer": SteerConfig, "scoreboard": ScoreboardConfig,
                             "report": ReportConfig,
                             "tracking": TrackingConfig}  # in flows.common.SECTION_NAMES' order (a test checks)


def read_all(params: dict[str, Any]) -> dict[str, Any]:
    """Every section of ``params`` (from :func:`flows.common.load_params`) as its dataclass, read strictly:
    a typo in any section fails here, before any stage runs."""
    return {name: section(params, name, cls) for name, cls in SECTIONS.items()}
