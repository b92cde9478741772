"""Stage 4, analysis: per-latent decoder statistics, Latent Scaling (β, ν), the chat-specific filters
and decoupling suspects of the ``--kind`` crosscoder: latents.parquet, summary.json and plots.
``python -m flows.analyze --kind KIND [--params FILE]``"""

from __future__ import annotations

from prefect import flow

from crossdiff_core.analysis import AnalysisConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.analysis import analyze_task
from tasks.io import write_json
from tasks.products import LATENTS, PLOTS, SUMMARY


@flow(name="crossdiff-analyze")
def analyze_flow(kind: str, params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, a = Layout(p), p["analyze"]
    section(p, "analyze", AnalysisConfig)  # a typo fails before any work
    out = L.analysis(kind)
    with tracking.stage_run(f"analyze-{kind}", params={"kind": kind, **a}, full_params=p,
                            params_file=p["params_file"], experiment=p["tracking"]["experiment"]) as run:
        run.log_input("crosscoder", L.crosscoder(kind), context="crosscoder")
        run.log_input("cache", L.cache, context="analysis")
        run.log_cache_lineage(L.cache)
        numbers = analyze_task(str(L.crosscoder(kind)), str(L.cache), str(out), a)
        run.log_metrics(numbers)
        run.log_output("analysis", out, artifact=False)
        for name in (LATENTS, SUMMARY, PLOTS):
            run.log_artifact(out / name, "analysis")
        write_json(numbers, L.metric(f"analyze_{kind}"))
    return numbers


if __name__ == "__main__":
    cli(analyze_flow, __doc__, kind=True)
