"""`crossdiff analyze`, `cards`: per-latent statistics, classes and latent cards of a trained crosscoder."""

from __future__ import annotations

import typer

from .common import AnalysisConfig, CardsConfig, _crosscoder_opt, _fail, _latents_opt, app
from .options import Spec, config_options

ANALYZE_OPTIONS = Spec(AnalysisConfig)
CARDS_OPTIONS = Spec(CardsConfig)


@app.command()
@config_options(ANALYZE_OPTIONS)
def analyze(
    crosscoder: str = _crosscoder_opt(),
    cache: str = typer.Option(..., help="activation cache directory to analyse over"),
    out: str = typer.Option(..., help="output latents.parquet (DESIGN §2)"),
    summary: str = typer.Option(None, help="summary JSON (default: OUT with .summary.json)"),
    plots: str = typer.Option(None, help="write the PNG plots into this directory"),
    **settings,
) -> None:
    """Per-latent decoder statistics, Latent Scaling (β, ν), filters and decoupling suspects."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..analysis import run_analysis
        from ..runs import default_summary_path

        cfg = ANALYZE_OPTIONS.build(settings)
        res = run_analysis(crosscoder, cache, out, summary_path=summary, plots_dir=plots, cfg=cfg)
    except CrossdiffError as err:
        _fail(err)
    s = res.summary
    typer.echo(json.dumps({"classes": s["classes"], "dead": s["dead"],
                           "chat_only_survivors": {k: v["survivors"] for k, v in s["filters"].items()},
                           "decoupling_pairs": s["decoupling"]["n_pairs"], "out": out,
                           "summary": str(summary or default_summary_path(out))}, indent=2))


@app.command()
@config_options(CARDS_OPTIONS)
def cards(
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
    cache: str = typer.Option(..., help="activation cache to find the top contexts in (with tokens.parquet)"),
    out: str = typer.Option(..., help="output JSON of latent cards"),
    steering: str = typer.Option(None, help="steering results (crossdiff steer) to attach"),
    tracking: str = typer.Option(None, help="behaviour-tracking table (crossdiff steer) to attach"),
    tokenizer: str = typer.Option(None, help="tokenizer directory (default: the chat model the cache records)"),
    **settings,
) -> None:
    """Latent cards: top contexts with per-token activations, histogram and statistics per latent."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..cards import cards_for
        from ..fileio import write_json
        from ..runs import read_stage_json, read_tracking

        cfg = CARDS_OPTIONS.build(settings)
        res = cards_for(crosscoder, latents, cache, cfg,
                        steering=read_stage_json(steering, required=("latents",)) if steering else None,
                        tracking=read_tracking(tracking) if tracking else None, tokenizer=tokenizer)
        write_json(res, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"cards": len(res["cards"]), "out": out, "seconds": round(res["seconds"], 1)}))
