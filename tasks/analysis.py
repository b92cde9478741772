"""Latent analysis of a trained crosscoder: latents.parquet, its summary JSON and the plots."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

LATENTS = "latents.parquet"
SUMMARY = "latents.summary.json"  # where crossdiff_core.analysis.default_summary_path puts it
PLOTS = "plots"


@task(name="analyze-crosscoder", cache_policy=NONE)
def analyze_task(crosscoder_dir: str, cache_dir: str, out_dir: str, settings: dict) -> dict:
    """:func:`crossdiff_core.analysis.run_analysis` into ``out_dir``; returns the summary's headline numbers."""
    from crossdiff_core.analysis import AnalysisConfig, run_analysis

    out = Path(out_dir)
    cfg = AnalysisConfig(**{k: v for k, v in settings.items() if k in AnalysisConfig.__dataclass_fields__})
    res = run_analysis(crosscoder_dir, cache_dir, out / LATENTS, summary_path=out / SUMMARY, plots_dir=out / PLOTS, cfg=cfg)
    return headline(res.summary)


def headline(summary: dict) -> dict:
    """The analysis numbers worth a metric: class counts, dead latents, filter survivors, decoupling."""
    f = summary["filters"]
    return {"classes": summary["classes"], "dead": summary["dead"],
            "chat_only_survivors": {k: f[k]["survivors"] for k in ("fixed", "data_driven", "both")},
            "decoupling_pairs": summary["decoupling"]["n_pairs"],
            "nu_error_median": summary["chat_only"]["nu_error_median"],
            "nu_recon_median": summary["chat_only"]["nu_recon_median"]}
