"""Prefect flows of the crossdiff pipeline (DESIGN §3): one per stage, ``python -m flows.<stage>``, and
``flows.pipeline`` for the whole run. Each reads its settings from params.yaml."""

import tasks  # noqa: F401  (sets the telemetry defaults before prefect is imported)
