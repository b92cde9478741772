"""A throw-away Prefect server for the pipeline and deployment tests (a temporary PREFECT_HOME and port)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.local_server import PrefectServer as LocalServer

QUIET = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}


def bin_dir() -> str:
    return str(Path(sys.executable).parent)


def base_env(home: Path) -> dict[str, str]:
    """Environment for Prefect/DVC/MLflow subprocesses: this venv first on PATH, a private PREFECT_HOME."""
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home)}
    env["PATH"] = bin_dir() + os.pathsep + env.get("PATH", "")
    env.pop("PREFECT_API_URL", None)
    return env


class PrefectServer(LocalServer):
    """The throw-away server of :mod:`flows.local_server`, with a private PREFECT_HOME under ``root`` and the
    tests' quiet environment."""

    def __init__(self, root: Path, timeout: float = 240):
        self.home = root / "prefect-home"
        super().__init__(self.home, root / "prefect-server.log", env=base_env(self.home), timeout=timeout)
