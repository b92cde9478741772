"""Prefect tasks of the crossdiff pipeline (DESIGN §3): thin units of work over crossdiff_core, plus the
MLflow records (tasks/tracking.py). Importing this package turns telemetry off unless the environment
already decides, and gives Prefect's temporary server time to start on a busy machine."""

import os

_DEFAULTS = {
    "DO_NOT_TRACK": "true",  # Prefect client and MLflow (the word "true")
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # the default 20 s fails on a loaded 2-core box
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in _DEFAULTS.items():
    os.environ.setdefault(_k, _v)
