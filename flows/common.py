"""What every stage flow shares: reading params.yaml, the command line, the artifact layout."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from crossdiff_core.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"
SECTIONS = ("paths", "models", "data", "cache", "train", "analyze", "evaluate", "steer", "report", "tracking")


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
    return params


def kinds(params: dict) -> list[str]:
    return list(params["train"].get("kinds", ["l1", "batchtopk"]))


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


def without(d: dict, *keys: str) -> dict:
    d = copy.deepcopy(d)
    for k in keys:
        d.pop(k, None)
    return d


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
