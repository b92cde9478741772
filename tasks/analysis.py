"""Latent analysis of a trained crosscoder: latents.parquet, its summary JSON and the plots."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .products import LATENTS, PLOTS, SUMMARY  # noqa: F401  (the analysis products' names)


@task(name="analyze-crosscoder", cache_policy=NONE)
def analyze_task(crosscoder_dir: str, cache_dir: str, out_dir: str, settings: dict) -> dict:
    """:func:`crossdiff_core.analysis.run_analysis` into ``out_dir``; returns the summary's headline numbers."""
    from crossdiff_core.analysis import AnalysisConfig, run_analysis
    from crossdiff_core.headlines import analysis_headline

    out = Path(out_dir)
    cfg = AnalysisConfig.from_dict(settings)
    res = run_analysis(crosscoder_dir, cache_dir, out / LATENTS, summary_path=out / SUMMARY, plots_dir=out / PLOTS, cfg=cfg)
    return analysis_headline(res.summary)
