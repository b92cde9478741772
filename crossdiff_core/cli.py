"""The `crossdiff` command line. Each command is a thin wrapper over a core function."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="crossdiff: diff a base and a fine-tuned model with crosscoders.")

# --- commands (each helper adds its own below; keep imports inside the functions so `--help` is fast) ---


def _fail(err: Exception) -> None:
    """Print a crossdiff error as one clear line and exit 2 (no traceback for bad input)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    out: str = typer.Option(..., help="output crosscoder directory (resumes from its checkpoint if present)"),
    kind: str = typer.Option(..., help="l1 or batchtopk"),
    dict_size: int = typer.Option(..., help="number of latents F"),
    k: int = typer.Option(None, help="BatchTopK: mean active latents per token"),
    l1_coeff: float = typer.Option(0.0, help="L1: sparsity coefficient λ (warmed up over the first 5% of steps)"),
    tokens: int = typer.Option(..., help="training tokens (epochs over the cache as needed)"),
    batch_size: int = typer.Option(2048, help="tokens per step"),
    lr: float = typer.Option(1e-4, help="peak learning rate (linear warm-up, linear decay)"),
    seed: int = typer.Option(0, help="seed for init and data order"),
    dtype: str = typer.Option("float32", help="compute dtype: float32 or bfloat16"),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda"),
    val_tokens: int = typer.Option(8192, help="tokens held out from the end of the cache for validation"),
    val_every: int = typer.Option(250, help="validate every N steps"),
    checkpoint_every: int = typer.Option(500, help="checkpoint every N steps"),
    init_norm: float = typer.Option(None, help="decoder row norm at init (default 0.05)"),
    metrics: str = typer.Option(None, help="also write the metrics JSON here (default OUT/metrics.json)"),
) -> None:
    """Train an L1 or BatchTopK crosscoder on an activation cache."""
    import json
    import shutil
    from pathlib import Path

    from .errors import CrossdiffError
    from .trainer import TrainConfig, train_crosscoder

    try:
        tc = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, dtype=dtype, device=device,
                         val_tokens=val_tokens, val_every=val_every, checkpoint_every=checkpoint_every)
        overrides = {} if init_norm is None else {"init_norm": init_norm}
        result = train_crosscoder(cache, out, kind=kind, dict_size=dict_size, k=k, l1_coeff=l1_coeff, train=tc,
                                  model_overrides=overrides)
    except CrossdiffError as err:
        _fail(err)
    if metrics:
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out) / "metrics.json", metrics)
    typer.echo(json.dumps({k: result[k] for k in ("fve_base", "fve_chat", "l0", "dead_fraction", "mse")}, indent=2))


@app.command()
def analyze(
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
    cache: str = typer.Option(..., help="activation cache directory to analyse over"),
    out: str = typer.Option(..., help="output latents.parquet (DESIGN §2)"),
    summary: str = typer.Option(None, help="summary JSON (default: OUT with .summary.json)"),
    plots: str = typer.Option(None, help="write the PNG plots into this directory"),
    batch_size: int = typer.Option(4096, help="tokens per batch of the streaming pass"),
    direction: str = typer.Option("auto", help="Latent Scaling direction: auto (base row for base-only latents), chat, base"),
    nu_error_max: float = typer.Option(0.2, help="fixed filter: chat-specific needs nu_error below this"),
    nu_recon_max: float = typer.Option(0.5, help="fixed filter: chat-specific needs nu_recon below this"),
    coverage: float = typer.Option(0.95, help="data-driven filter: central interval of the shared latents' nu"),
    decoupling_cosine: float = typer.Option(0.9, help="decoupling suspects: chat-only/base-only decoder cosine above this"),
    allow_other_cache: bool = typer.Option(False, help="analyse on a cache other than the training one without checking its models"),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda"),
) -> None:
    """Per-latent decoder statistics, Latent Scaling (β, ν), filters and decoupling suspects."""
    import json

    from .errors import CrossdiffError

    try:
        from .analysis import AnalysisConfig, default_summary_path, run_analysis

        cfg = AnalysisConfig(batch_size=batch_size, direction=direction, nu_error_max=nu_error_max,
                             nu_recon_max=nu_recon_max, coverage=coverage, decoupling_cosine=decoupling_cosine,
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
def cache(
    base: str = typer.Option(..., help="base model: local directory or cached hub id"),
    chat: str = typer.Option(..., help="chat model (its chat template formats the chats)"),
    layer: int = typer.Option(..., help="block L whose residual output is cached (0-based)"),
    out: str = typer.Option(..., help="cache directory (DESIGN §2); a re-run resumes it"),
    text: list[str] = typer.Option(None, help="text data (a `text` column): .parquet/.jsonl file or datasets name; repeatable"),
    chats: list[str] = typer.Option(None, help="chat data (a `messages` column); repeatable"),
    tokens: int = typer.Option(None, help="tokens to cache (default: all the data)"),
    max_length: int = typer.Option(1024, help="tokens per sequence, BOS included"),
    dtype: str = typer.Option("bfloat16", help="model dtype: bfloat16 or float32"),
    cache_dtype: str = typer.Option("bfloat16", help="stored activation dtype: bfloat16 or float32"),
    device: str = typer.Option("cpu", help="torch device: cpu, cuda, cuda:N or auto"),
    batch_size: int = typer.Option(8, help="sequences per forward pass"),
    text_fraction: float = typer.Option(0.5, help="share of the tokens from text when both kinds are given"),
    seed: int = typer.Option(0, help="seed for the data order"),
    split: str = typer.Option("train", help="dataset split for datasets names"),
    shard_tokens: int = typer.Option(65536, help="tokens per shard (the unit of resumption)"),
    progress: bool = typer.Option(True, help="show a progress bar with tokens/s"),
) -> None:
    """Cache block-L residual activations of a base and a chat model on text and chat data."""
    import json

    from .errors import CrossdiffError

    try:
        from .caching import run_cache
        from .data import DataConfig

        data = DataConfig(text=text or [], chats=chats or [], n_tokens=tokens, max_length=max_length,
                          text_fraction=text_fraction, seed=seed, split=split)
        run = run_cache(base, chat, out, data, layer=layer, dtype=dtype, device=device, batch_size=batch_size,
                        shard_tokens=shard_tokens, cache_dtype=cache_dtype, progress=progress)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"out": out, "n_tokens": run.manifest["n_tokens"], "shards": len(run.manifest["shards"]),
                           "computed": len(run.computed), "skipped": len(run.skipped),
                           "tokens_per_s": round(run.tokens_per_s, 1)}, indent=2))


if __name__ == "__main__":
    app()
