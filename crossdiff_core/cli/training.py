"""`crossdiff train`: a crosscoder from an activation cache."""

from __future__ import annotations

import typer

from .common import CrossCoderSettings, TrainConfig, _fail, _not_for_kind, app
from .options import Spec, config_options

# nproc: data-parallel runs start with torchrun (crossdiff_core.distributed); kinds: the pipeline's list
TRAIN_OPTIONS = Spec(TrainConfig, exclude=("crosscoder", "kinds", "nproc"))
CROSSCODER_OPTIONS = Spec(CrossCoderSettings)


@app.command()
@config_options(TRAIN_OPTIONS, CROSSCODER_OPTIONS)
def train(
    ctx: typer.Context,
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    out: str = typer.Option(..., help="output crosscoder directory (resumes from its checkpoint if present)"),
    kind: str = typer.Option(..., help="l1, batchtopk, shared (L1 with designated latents whose decoder is tied "
                                       "across the models) or dfc (BatchTopK with latents exclusive to each model)"),
    metrics: str = typer.Option(None, help="also write the metrics JSON here (default OUT/metrics.json)"),
    **settings,
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
        # auto resolved, a missing GPU refused before any work
        settings["device"] = str(resolve_device(settings["device"]))
        tc = TRAIN_OPTIONS.build(settings, crosscoder=CROSSCODER_OPTIONS.build(settings))
        result = train_crosscoder(cache, out, kind=kind, train=tc)
    except CrossdiffError as err:
        _fail(err)
    if metrics:
        Path(metrics).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out) / "metrics.json", metrics)
    typer.echo(json.dumps({k: result[k] for k in ("fve_base", "fve_chat", "l0", "dead_fraction", "mse")}, indent=2))
