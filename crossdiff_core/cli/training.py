"""`crossdiff train`: a crosscoder from an activation cache."""

from __future__ import annotations

import typer

from .common import CROSSCODER, TRAIN, CrossCoderSettings, TrainConfig, _fail, _not_for_kind, app


@app.command()
def train(
    ctx: typer.Context,
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    out: str = typer.Option(..., help="output crosscoder directory (resumes from its checkpoint if present)"),
    kind: str = typer.Option(..., help="l1, batchtopk, shared (L1 with designated latents whose decoder is tied "
                                       "across the models) or dfc (BatchTopK with latents exclusive to each model)"),
    dict_size: int = typer.Option(CROSSCODER["dict_size"], help="number of latents F"),
    k: int = typer.Option(CROSSCODER["k"], help="batchtopk and dfc only: mean active latents per token"),
    l1_coeff: float = typer.Option(CROSSCODER["l1_coeff"], help="l1 and shared only: sparsity coefficient λ > 0 (warmed up over the first 5% of steps)"),
    shared_fraction: float = typer.Option(CROSSCODER["shared_fraction"], help="shared only: share of the latents "
                                          "(the first ones) whose decoder is tied across the two models"),
    shared_l1_ratio: float = typer.Option(CROSSCODER["shared_l1_ratio"], help="shared only: λ_shared / λ, the tied "
                                          "latents' reduced L1 penalty, in (0, 1] (Anthropic 2025: 0.1-0.2)"),
    dfc_exclusive: float = typer.Option(CROSSCODER["dfc_exclusive"], help="dfc only: share of the latents exclusive "
                                        "to each model (the first ones base, the next chat; they read and write that "
                                        "model only), below 0.5"),
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
    init_norm: float = typer.Option(CROSSCODER["init_norm"], help="decoder row norm at init (default: per kind, L1 and shared 0.05, BatchTopK and dfc 1.0)"),
    normalisation: str = typer.Option(CROSSCODER["normalisation"], help="input scales: joint (one for both models), per_model, or none (raw units, the paper's code)"),
    metrics: str = typer.Option(None, help="also write the metrics JSON here (default OUT/metrics.json)"),
) -> None:
    """Train a crosscoder (l1, batchtopk, shared or dfc) on an activation cache."""
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
                                normalisation=normalisation, shared_fraction=shared_fraction,
                                shared_l1_ratio=shared_l1_ratio, dfc_exclusive=dfc_exclusive)
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
