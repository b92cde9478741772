"""A throw-away Prefect server for the pipeline and deployment tests (a temporary PREFECT_HOME and port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

QUIET = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> str:
    return str(Path(sys.executable).parent)


def base_env(home: Path) -> dict[str, str]:
    """Environment for Prefect/DVC/MLflow subprocesses: this venv first on PATH, a private PREFECT_HOME."""
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home)}
    env["PATH"] = bin_dir() + os.pathsep + env.get("PATH", "")
    env.pop("PREFECT_API_URL", None)
    return env


class PrefectServer:
    """``prefect server start`` in its own process group; ``stop()`` ends exactly that group."""

    def __init__(self, root: Path, timeout: float = 240):
        self.home = root / "prefect-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = open(root / "prefect-server.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(bin_dir()) / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-ui", "--no-scheduler", "--no-late-runs"],
            env=base_env(self.home), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(root / 'prefect-server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout} s")

    def env(self) -> dict[str, str]:
        return {**base_env(self.home), "PREFECT_API_URL": self.url}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
