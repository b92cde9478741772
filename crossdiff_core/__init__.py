"""crossdiff: model diffing with crosscoders (Minder et al., 2025, arXiv 2504.02922).

A plain library: no orchestration imports here (prefect, mlflow and dvc live in tasks/ and flows/).
"""

__version__ = "0.1.0"
