"""Run a command against a throw-away local Prefect server, so that the flows it starts (one per DVC
stage) share one API instead of each starting Prefect's temporary server (≈ 7 s each on 2 cores, ≈ 2 s
against a running server: STACK-NOTES).

    python -m flows.local_server -- dvc repro          # what `make demo` runs

With ``PREFECT_API_URL`` already set (a server of your own), the command just runs against it."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """``prefect server start`` on a free port in its own process group, with its database under ``home``;
    ``stop()`` ends exactly that group."""

    def __init__(self, home: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 240):
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self._env = {**(env if env is not None else os.environ), "PREFECT_HOME": str(home)}
        self._env.pop("PREFECT_API_URL", None)
        self.log = open(log, "w")
        prefect = str(Path(sys.executable).parent / "prefect")
        self.proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui", "--no-scheduler",
             "--no-late-runs"], env=self._env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {Path(log).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout} s (log: {log})")

    def env(self) -> dict[str, str]:
        return {**self._env, "PREFECT_API_URL": self.url}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=".prefect-local", help="the server's PREFECT_HOME (its SQLite database)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the command to run after --, e.g. -- dvc repro")
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(cmd)
    home = Path(a.home).resolve()
    server = PrefectServer(home, home.parent / f"{home.name}.log")
    print(f"Prefect server for this run: {server.url}", flush=True)
    try:
        return subprocess.call(cmd, env=server.env())
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
