"""`crossdiff cache`, `cache-info`, `synth`, `synth-score`: activation caches, real and synthetic."""

from __future__ import annotations

import typer

from .common import CACHE, DATA, DataConfig, _crosscoder_opt, _fail, _progress_opt, app


@app.command()
def cache(
    base: str = typer.Option(..., help="base model: local directory or cached hub id"),
    chat: str = typer.Option(..., help="chat model (its chat template formats the chats)"),
    layer: list[int] = typer.Option(..., help="block L whose residual output is cached (0-based); repeatable: several blocks from one forward pass, one cache each in OUT/layer-L/"),
    out: str = typer.Option(..., help="cache directory (DESIGN §2; with several --layer, one per layer under it); a re-run resumes it"),
    text: list[str] = typer.Option(None, help="text data (a `text` column): .parquet/.jsonl file or datasets name; repeatable"),
    chats: list[str] = typer.Option(None, help="chat data (a `messages` column); repeatable"),
    tokens: int = typer.Option(DATA["n_tokens"], help="tokens to cache (default: all the data)"),
    max_length: int = typer.Option(DATA["max_length"], help="tokens per sequence, BOS included"),
    dtype: str = typer.Option(CACHE["model_dtype"], help="model dtype: bfloat16 or float32"),
    cache_dtype: str = typer.Option(CACHE["dtype"], help="stored activation dtype: bfloat16 or float32"),
    device: str = typer.Option(CACHE["device"], help="torch device: cpu, cuda, cuda:N or auto"),
    batch_size: int = typer.Option(CACHE["batch_size"], help="sequences per forward pass"),
    text_fraction: float = typer.Option(DATA["text_fraction"], help="share of the tokens from text when both kinds are given"),
    seed: int = typer.Option(DATA["seed"], help="seed for the data order"),
    split: str = typer.Option(DATA["split"], help="dataset split for datasets names"),
    shard_tokens: int = typer.Option(CACHE["shard_tokens"], help="tokens per shard (the unit of resumption)"),
    progress: bool = typer.Option(CACHE["progress"], help="show a progress bar with tokens/s"),
    overwrite: bool = typer.Option(CACHE["overwrite"], help="replace a cache in --out made with other settings (its cache files are deleted first); without it such a run is refused"),
) -> None:
    """Cache block-L residual activations of a base and a chat model on text and chat data."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..caching import run_cache

        data = DataConfig(text=text or [], chats=chats or [], n_tokens=tokens, max_length=max_length,
                          text_fraction=text_fraction, seed=seed, split=split)
        from ..caching import layer_dirs

        layers = layer[0] if len(layer) == 1 else list(layer)
        run = run_cache(base, chat, out, data, layer=layers, dtype=dtype, device=device, batch_size=batch_size,
                        shard_tokens=shard_tokens, cache_dtype=cache_dtype, progress=progress, overwrite=overwrite)
        dirs = {str(L): str(d) for L, d in layer_dirs(out, layer).items()}
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"out": out, "n_tokens": run.manifest["n_tokens"], "shards": len(run.manifest["shards"]),
                           "computed": len(run.computed), "skipped": len(run.skipped),
                           "tokens_per_s": round(run.tokens_per_s, 1), "layers": dirs}, indent=2))


@app.command("cache-info")
def cache_info(
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    verify: bool = typer.Option(True, help="check every shard's sha256 against the manifest"),
    check_values: bool = typer.Option(True, help="read every activation and refuse NaN/inf (exit code 2 naming the shards)"),
) -> None:
    """Summarise an activation cache (size, dtype, scales, tokens); verify its checksums and that its values are finite."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..cache import cache_summary

        summary = cache_summary(cache, verify=verify, check_values=check_values)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def synth(
    out: str = typer.Option(..., help="cache directory to write (DESIGN §2) plus truth.json/truth.safetensors"),
    n_tokens: int = typer.Option(200_000, help="tokens to generate"),
    d_model: int = typer.Option(64, help="activation width"),
    shared: int = typer.Option(160, help="planted shared features"),
    chat_only: int = typer.Option(40, help="planted chat-only features"),
    base_only: int = typer.Option(40, help="planted base-only features"),
    weakly_shared: int = typer.Option(40, help="planted weakly-shared features (base at 0.2-0.5 of chat)"),
    changed: int = typer.Option(40, help="planted changed-direction features"),
    mean_active: float = typer.Option(8.0, help="expected active planted features per token"),
    noise_std: float = typer.Option(0.05, help="isotropic noise per dimension"),
    chat_gain: float = typer.Option(1.0, help="overall scale of the chat activations"),
    seed: int = typer.Option(0, help="seed of the planted features and the tokens"),
    dtype: str = typer.Option("float32", help="stored activation dtype: float32 or bfloat16"),
    progress: bool = _progress_opt(),
    overwrite: bool = typer.Option(False, help="replace a cache in --out written with another config (its cache files are deleted first); without it such a run is refused"),
) -> None:
    """Write a synthetic activation cache with planted features of known class (the ground truth)."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..synthetic import SyntheticConfig, write_cache

        cfg = SyntheticConfig(d_model=d_model, n_shared=shared, n_chat_only=chat_only, n_base_only=base_only,
                              n_weakly_shared=weakly_shared, n_changed=changed, mean_active=mean_active,
                              noise_std=noise_std, chat_gain=chat_gain, n_tokens=n_tokens, seed=seed)
        manifest = write_cache(cfg, out, dtype=dtype, progress=progress, overwrite=overwrite)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"out": out, "n_tokens": manifest["n_tokens"], "shards": len(manifest["shards"]),
                           "features": cfg.counts}, indent=2))


@app.command("synth-score")
def synth_score(
    crosscoder: str = _crosscoder_opt(),
    cache: str = typer.Option(None, help="synthetic cache with the planted truth (default: the crosscoder's training cache)"),
    out: str = typer.Option(None, help="write the scores as JSON here (and the per-feature matches next to it as .parquet)"),
    threshold: float = typer.Option(0.9, help="a planted feature is recovered when a decoder row has cosine above this"),
) -> None:
    """Score a crosscoder trained on a `crossdiff synth` cache: recovery per class and class confusion."""
    import json
    from pathlib import Path

    from ..errors import ConfigError, CrossdiffError

    try:
        from ..crosscoder import CrossCoder
        from ..fileio import atomic_write
        from ..synthetic import load_truth, score

        model = CrossCoder.load(crosscoder)
        cache_dir = cache or model.cfg.cache
        if not cache_dir:
            raise ConfigError(f"{crosscoder} does not record its training cache: pass --cache DIR")
        result = score(model, load_truth(cache_dir), threshold=threshold)
    except CrossdiffError as err:
        _fail(err)
    matches = result.pop("matches")
    text = json.dumps(result, indent=2)
    if out:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda p: Path(p).write_text(text + "\n"))
        atomic_write(target.with_suffix(".parquet"), lambda p: matches.to_parquet(p, index=False))
    typer.echo(text)
