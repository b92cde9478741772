"""`crossdiff train`: a crosscoder from an activation cache."""

from __future__ import annotations

import typer

from .common import CROSSCODER, TRAIN, CrossCoderSettings, TrainConfig, _fail, _not_for_kind, app


@app.command()
def train(
    ctx: typer.Context,
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    out: str = typer.Option(..., help="output crosscoder directory (resumes from its checkpoint if present)"),
    kind: str = typer.Option(..., help="l1 or batchtopk"),
    dict_size: int = typer.Option(CROSSCODER["dict_size"], help="number of latents F"),
    k: int = typer.Option(CROSSCODER["k"], help="BatchTopK only: mean active latents per token"),
    l1_coeff: float = typer.Option(CROSSCODER["l1_coeff"], help="L1 only: sparsity coefficient λ > 0 (warmed up over the first 5% of steps)"),
    tokens: int = typer.Option(TRAIN["tokens"], help="training tokens (epochs over the cache as needed)"),
    batch_size: int = typer.Option(TRAIN["batch_size"], help="tokens per step"),
    lr: float = typer.Option(TRAIN["lr"], help="peak learning rate (linear warm-up, linear decay)"),
    seed: int = typer.Option(TRAIN["seed"], help="seed for init and data order"),
    dtype: str = typer.Option(TRAIN["dtype"], help="compute dtype: float32 or bfloat16"),
    device: str = typer.Option(TRAIN["device"], help="torch device, e.g. cuda"),
    val_tokens: int = typer.Option(TRAIN["val_tokens"], help="tokens held out from the end of the cache for validation"),
    val_every: int = typer.Option(TRAIN["val_every"], help="validate every N steps"),
    checkpoint_every: int = typer.Option(TRAIN["checkpoint_every"], help="checkpoint every N steps"),
    dead_tokens: int = typer.Option(TRAIN["dead_tokens"], help="a latent unfired for this many tokens is dead (AuxK)"),
    init_norm: float = typer.Option(CROSSCODER["init_norm"], help="decoder row norm at init (default: per kind, L1 0.05, BatchTopK 1.0)"),
    normalisation: str = typer.Option(CROSSCODER["normalisation"], help="input scales: joint (one for both models), per_model, or none (raw units, the paper's code)"),
    metrics: str = typer.Option(None, help="also write the metrics JSON here (default OUT/metrics.json)"),
) -> None:
    """Train an L1 or BatchTopK crosscoder on an activation cache."""
    import json
    import shutil
    from pathlib import Path

    from ..errors import CrossdiffError
    from ..trainer import train_crosscoder

    try:
        from ..models import resolve_device

        _not_for_kind(ctx, kind)
        device = str(resolve_device(device))  # auto resolved, a missing GPU refused before any work
        cc = CrossCoderSettings(dict_size=dict_size, k=k, l1_coeff=l1_coeff, init_norm=init_norm,
                                normalisation=normalisation)
        tc = TrainConfig(crosscoder=cc, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, dtype=dtype,
                         device=device, val_tokens=val_tokens, val_every=val_every, checkpoint_every=checkpoint_every,
                         dead_tokens=dead_tokens)
        result = train_crosscoder(cache, out, kind=kind, train=tc)
    except CrossdiffError as err:
        _fail(err)
    if metrics:
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out) / "metrics.json", metrics)
    typer.echo(json.dumps({k: result[k] for k in ("fve_base", "fve_chat", "l0", "dead_fraction", "mse")}, indent=2))
