"""`crossdiff analyze`, `cards`: per-latent statistics, classes and latent cards of a trained crosscoder."""

from __future__ import annotations

import typer

from .common import ANALYZE, CARDS, AnalysisConfig, CardsConfig, _crosscoder_opt, _fail, _latents_opt, app


@app.command()
def analyze(
    crosscoder: str = _crosscoder_opt(),
    cache: str = typer.Option(..., help="activation cache directory to analyse over"),
    out: str = typer.Option(..., help="output latents.parquet (DESIGN §2)"),
    summary: str = typer.Option(None, help="summary JSON (default: OUT with .summary.json)"),
    plots: str = typer.Option(None, help="write the PNG plots into this directory"),
    batch_size: int = typer.Option(ANALYZE["batch_size"], help="tokens per batch of the streaming pass"),
    direction: str = typer.Option(ANALYZE["direction"], help="Latent Scaling direction: auto (base row for base-only latents), chat, base"),
    nu_error_max: float = typer.Option(ANALYZE["nu_error_max"], help="fixed filter: chat-specific needs nu_error below this"),
    nu_recon_max: float = typer.Option(ANALYZE["nu_recon_max"], help="fixed filter: chat-specific needs nu_recon below this"),
    coverage: float = typer.Option(ANALYZE["coverage"], help="data-driven filter: central interval of the shared latents' nu"),
    min_shared_fires: int = typer.Option(ANALYZE["min_shared_fires"], help="data-driven filter: only shared latents firing on at least this many tokens"),
    decoupling_cosine: float = typer.Option(ANALYZE["decoupling_cosine"], help="decoupling suspects: chat-only/base-only decoder cosine above this"),
    allow_other_cache: bool = typer.Option(ANALYZE["allow_other_cache"], help="analyse on a cache other than the training one without checking its models"),
    device: str = typer.Option(ANALYZE["device"], help="torch device, e.g. cuda"),
) -> None:
    """Per-latent decoder statistics, Latent Scaling (β, ν), filters and decoupling suspects."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..analysis import run_analysis
        from ..runs import default_summary_path

        cfg = AnalysisConfig(batch_size=batch_size, direction=direction, nu_error_max=nu_error_max,
                             nu_recon_max=nu_recon_max, coverage=coverage, min_shared_fires=min_shared_fires,
                             decoupling_cosine=decoupling_cosine,
                             allow_other_cache=allow_other_cache, device=device)
        res = run_analysis(crosscoder, cache, out, summary_path=summary, plots_dir=plots, cfg=cfg)
    except CrossdiffError as err:
        _fail(err)
    s = res.summary
    typer.echo(json.dumps({"classes": s["classes"], "dead": s["dead"],
                           "chat_only_survivors": {k: v["survivors"] for k, v in s["filters"].items()},
                           "decoupling_pairs": s["decoupling"]["n_pairs"], "out": out,
                           "summary": str(summary or default_summary_path(out))}, indent=2))


@app.command()
def cards(
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
    cache: str = typer.Option(..., help="activation cache to find the top contexts in (with tokens.parquet)"),
    out: str = typer.Option(..., help="output JSON of latent cards"),
    steering: str = typer.Option(None, help="steering results (crossdiff steer) to attach"),
    tracking: str = typer.Option(None, help="behaviour-tracking table (crossdiff steer) to attach"),
    tokenizer: str = typer.Option(None, help="tokenizer directory (default: the chat model the cache records)"),
    n_contexts: int = typer.Option(CARDS["n_contexts"], help="top-activating contexts per latent"),
    before: int = typer.Option(CARDS["before"], help="context tokens before the top token"),
    after: int = typer.Option(CARDS["after"], help="context tokens after it"),
    n_shared: int = typer.Option(CARDS["n_shared"], help="shared latents sampled for comparison"),
    max_chat_only: int = typer.Option(CARDS["max_chat_only"], help="at most this many chat-only latents (most chat-specific first; default: all)"),
    batch_size: int = typer.Option(CARDS["batch_size"], help="cache rows per batch"),
    seed: int = typer.Option(CARDS["seed"], help="seed of the shared sample"),
    device: str = typer.Option(CARDS["device"], help="torch device"),
    progress: bool = typer.Option(CARDS["progress"], help="show a progress bar"),
    allow_mismatch: bool = typer.Option(CARDS["allow_mismatch"], help="use a cache or a latents.parquet that is not the crosscoder's own, deliberately (the content checks are skipped)"),
) -> None:
    """Latent cards: top contexts with per-token activations, histogram and statistics per latent."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..cards import cards_for
        from ..fileio import write_json
        from ..runs import read_stage_json, read_tracking

        cfg = CardsConfig(n_contexts=n_contexts, before=before, after=after, n_shared=n_shared,
                          max_chat_only=max_chat_only, batch_size=batch_size, seed=seed, device=device, progress=progress,
                          allow_mismatch=allow_mismatch)
        res = cards_for(crosscoder, latents, cache, cfg,
                        steering=read_stage_json(steering, required=("latents",)) if steering else None,
                        tracking=read_tracking(tracking) if tracking else None, tokenizer=tokenizer)
        write_json(res, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"cards": len(res["cards"]), "out": out, "seconds": round(res["seconds"], 1)}))
