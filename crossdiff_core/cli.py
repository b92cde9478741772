"""The `crossdiff` command line. Each command is a thin wrapper over a core function."""

from __future__ import annotations

import typer

from .analysis import AnalysisConfig
from .caching import CacheConfig
from .cards import CardsConfig
from .config import defaults
from .crosscoder import CrossCoderSettings
from .data import DataConfig
from .kl_eval import EvaluateConfig
from .report.page import TITLE
from .steering import SteerConfig
from .trainer import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="crossdiff: diff a base and a fine-tuned model with crosscoders.")

# every option's default is its config dataclass's (stated once, there); the settings dataclasses are
# imported above for that, the work each command does is imported inside it
TRAIN, CROSSCODER, ANALYZE = defaults(TrainConfig), defaults(CrossCoderSettings), defaults(AnalysisConfig)
DATA, CACHE, EVALUATE = defaults(DataConfig), defaults(CacheConfig), defaults(EvaluateConfig)
STEER, CARDS = defaults(SteerConfig), defaults(CardsConfig)

# --- commands (each helper adds its own below) ---


def _fail(err: Exception) -> None:
    """Print a crossdiff error as one clear line and exit 2 (no traceback for bad input)."""
    typer.secho(f"error: {' '.join(str(err).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _not_for_kind(ctx: typer.Context, kind: str) -> None:
    """Refuse an option given on the command line that the crosscoder ``kind`` has no use for (``--k`` for
    L1, ``--l1-coeff`` for BatchTopK: the field metadata ``kind`` of :class:`CrossCoderSettings`); it would
    be silently dropped, or recorded in config.json as if it had mattered."""
    import dataclasses

    from .errors import ConfigError

    for f in dataclasses.fields(CrossCoderSettings):
        owner = f.metadata.get("kind")
        # by name: typer vendors its own click, whose ParameterSource is another enum than click's
        given = getattr(ctx.get_parameter_source(f.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
        if owner and owner != kind and given:
            raise ConfigError(f"--{f.name.replace('_', '-')} applies to {owner} crosscoders only, not to --kind {kind}: "
                              "leave it out")


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

    from .errors import CrossdiffError
    from .trainer import train_crosscoder

    try:
        from .models import resolve_device

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


@app.command()
def analyze(
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
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

    from .errors import CrossdiffError

    try:
        from .analysis import run_analysis
        from .runs import default_summary_path

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

    from .errors import CrossdiffError

    try:
        from .caching import run_cache

        data = DataConfig(text=text or [], chats=chats or [], n_tokens=tokens, max_length=max_length,
                          text_fraction=text_fraction, seed=seed, split=split)
        from .caching import layer_dirs

        layers = layer[0] if len(layer) == 1 else list(layer)
        run = run_cache(base, chat, out, data, layer=layers, dtype=dtype, device=device, batch_size=batch_size,
                        shard_tokens=shard_tokens, cache_dtype=cache_dtype, progress=progress, overwrite=overwrite)
        dirs = {str(L): str(d) for L, d in layer_dirs(out, layer).items()}
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"out": out, "n_tokens": run.manifest["n_tokens"], "shards": len(run.manifest["shards"]),
                           "computed": len(run.computed), "skipped": len(run.skipped),
                           "tokens_per_s": round(run.tokens_per_s, 1), "layers": dirs}, indent=2))


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
    progress: bool = typer.Option(True, help="show a progress bar"),
    overwrite: bool = typer.Option(False, help="replace a cache in --out written with another config (its cache files are deleted first); without it such a run is refused"),
) -> None:
    """Write a synthetic activation cache with planted features of known class (the ground truth)."""
    import json

    from .errors import CrossdiffError

    try:
        from .synthetic import SyntheticConfig, write_cache

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
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
    cache: str = typer.Option(None, help="synthetic cache with the planted truth (default: the crosscoder's training cache)"),
    out: str = typer.Option(None, help="write the scores as JSON here (and the per-feature matches next to it as .parquet)"),
    threshold: float = typer.Option(0.9, help="a planted feature is recovered when a decoder row has cosine above this"),
) -> None:
    """Score a crosscoder trained on a `crossdiff synth` cache: recovery per class and class confusion."""
    import json
    from pathlib import Path

    from .errors import ConfigError, CrossdiffError

    try:
        from .crosscoder import CrossCoder
        from .fileio import atomic_write
        from .synthetic import load_truth, score

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


@app.command("toy-models")
def toy_models(
    out: str = typer.Option(..., "--out", help="Directory to write (base/, chat/, ground_truth.json, build.json)."),
    config: str = typer.Option(None, "--config", help="YAML/JSON file of settings: a params.yaml (its `models.toy` section is used) or the section itself."),
    set_: list[str] = typer.Option([], "--set", help="Override one setting, KEY=VALUE (YAML value), repeatable."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if OUT is complete with the same settings."),
) -> None:
    """Build the embedded default model pair (tiny Llama base on Shakespeare, chat version with planted behaviours)."""
    import logging

    import yaml

    from .errors import ConfigError, CrossdiffError
    from .toy import ToyModelsConfig, build_toy_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings: dict = {}
    try:
        if config:
            try:
                with open(config) as f:
                    loaded = yaml.safe_load(f) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ConfigError(f"--config {config}: not a readable YAML/JSON file ({' '.join(str(exc).split())})") from None
            section = loaded.get("models", loaded) if isinstance(loaded, dict) else {}
            if isinstance(section, dict) and isinstance(section.get("toy"), dict):  # params.yaml: models.toy
                section = section["toy"]
            if not isinstance(section, dict):
                raise ConfigError(f"--config {config} holds no mapping of settings (models.toy of a params.yaml, or the section)")
            settings = dict(section)
        for item in set_:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set finetune_steps=300)")
            try:
                settings[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: the value is not YAML ({' '.join(str(exc).split())})") from None
        result = build_toy_models(out, ToyModelsConfig.from_dict(settings), force=force, progress=True)
    except CrossdiffError as err:
        _fail(err)
    for model, r in result.rates.items():
        for name, v in r["rates"].items():
            typer.echo(f"{model:5s} {name:16s} trigger {v['trigger_rate']:.3f} (n={v['n_trigger']})  "
                       f"other {v['other_rate']:.3f} (n={v['n_other']})")
    typer.echo(f"{'skipped (complete)' if result.skipped else 'built'} {result.out_dir} in {result.seconds:.0f} s; "
               f"planted behaviours {'PASS' if result.passed else 'FAIL'}")
    if not result.passed:
        typer.echo("planted behaviours missed their target rates: raise finetune_steps (see ground_truth.json)", err=True)
        raise typer.Exit(1)


@app.command("cache-info")
def cache_info(
    cache: str = typer.Option(..., help="activation cache directory (DESIGN §2)"),
    verify: bool = typer.Option(True, help="check every shard's sha256 against the manifest"),
    check_values: bool = typer.Option(True, help="read every activation and refuse NaN/inf (exit code 2 naming the shards)"),
) -> None:
    """Summarise an activation cache (size, dtype, scales, tokens); verify its checksums and that its values are finite."""
    import json

    from .errors import CrossdiffError

    try:
        from .cache import cache_summary

        summary = cache_summary(cache, verify=verify, check_values=check_values)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def evaluate(
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
    latents: str = typer.Option(..., help="its latents.parquet (crossdiff analyze)"),
    chats: list[str] = typer.Option(..., help="held-out chat data (a `messages` column): .parquet/.jsonl file or datasets name; repeatable"),
    out: str = typer.Option(..., help="output JSON: KL and % of the gap closed per patch set and token group"),
    base: str = typer.Option(None, help="base model (default: the one the crosscoder's training cache records)"),
    chat: str = typer.Option(None, help="chat model (default: from the training cache)"),
    layer: int = typer.Option(None, help="block L (default: from the training cache)"),
    tokens: int = typer.Option(EVALUATE["tokens"], help="conversation tokens to evaluate on"),
    max_length: int = typer.Option(EVALUATE["max_length"], help="tokens per conversation, BOS included"),
    split: str = typer.Option(EVALUATE["split"], help="dataset split for datasets names"),
    messages_column: str = typer.Option(EVALUATE["messages_column"], help="the chats' {role, content} list column"),
    n_random: int = typer.Option(EVALUATE["n_random"], help="random sets of chat-only latents (the spread)"),
    seed: int = typer.Option(EVALUATE["seed"], help="seed for the conversation order and the random sets"),
    batch_size: int = typer.Option(EVALUATE["batch_size"], help="conversations per batch"),
    dtype: str = typer.Option(EVALUATE["dtype"], help="model dtype: float32 or bfloat16"),
    device: str = typer.Option(EVALUATE["device"], help="torch device: cpu, cuda or auto"),
    progress: bool = typer.Option(EVALUATE["progress"], help="show a progress bar"),
    allow_mismatch: bool = typer.Option(EVALUATE["allow_mismatch"], help="use models or a latents.parquet that are not the crosscoder's own, deliberately (the checks of their content fingerprints are skipped)"),
) -> None:
    """KL-gap patching: how much of the chat model's behaviour each set of latents carries."""
    import json

    from .errors import CrossdiffError

    try:
        from .fileio import write_json
        from .kl_eval import evaluate_crosscoder

        cfg = EvaluateConfig(chats=list(chats), messages_column=messages_column, split=split, tokens=tokens,
                             max_length=max_length, n_random=n_random, seed=seed, batch_size=batch_size, dtype=dtype,
                             device=device, progress=progress, allow_mismatch=allow_mismatch)
        d = evaluate_crosscoder(crosscoder, latents, cfg, base=base, chat=chat, layer=layer)
        write_json(d, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({r["name"]: r["gap_closed"] for r in d["sets"] if not r["group"]} | {
        f"{g} (mean)": v["gap_closed_mean"] for g, v in d["groups"].items()}, indent=1))


@app.command()
def steer(
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
    latents: str = typer.Option(..., help="its latents.parquet (crossdiff analyze)"),
    out: str = typer.Option(..., help="output JSON: generations, KL and behaviour rates per latent, model and a"),
    behaviours: str = typer.Option(STEER["behaviours"], "--behaviours", "--ground-truth",
                                   help="behaviour spec: behaviours.yaml/.json (README 'Behaviour specs'), or a toy pair's ground_truth.json / build dir: tracking, behaviour rates and default prompts (--ground-truth: old name)"),
    prompts: str = typer.Option(None, help="prompt file (.txt lines, or .jsonl/.json with `text`); default: the behaviour spec's"),
    latent: list[int] = typer.Option(None, help="latents to steer (repeatable); default: chosen by ν rank, tracking and a shared sample"),
    alphas: str = typer.Option(",".join(f"{a:g}" for a in STEER["alphas"]), help="comma-separated steering coefficients a"),
    n_top: int = typer.Option(STEER["n_top"], help="default choice: most chat-specific chat-only latents (ν rank)"),
    n_tracking: int = typer.Option(STEER["n_tracking"], help="default choice: best trackers of each behaviour over all live latents (plus each class's best)"),
    n_shared: int = typer.Option(STEER["n_shared"], help="default choice: random shared latents (controls)"),
    max_prompts: int = typer.Option(STEER["max_prompts"], help="use at most this many prompts (each behaviour keeps its share); 0: all"),
    max_new_tokens: int = typer.Option(STEER["max_new_tokens"], help="tokens generated per answer"),
    tracking: str = typer.Option(None, help="behaviour-tracking table output (default: OUT with .tracking.parquet)"),
    base: str = typer.Option(None, help="base model (default: from the crosscoder's training cache)"),
    chat: str = typer.Option(None, help="chat model (default: from the training cache)"),
    layer: int = typer.Option(None, help="block L (default: from the training cache)"),
    batch_size: int = typer.Option(STEER["batch_size"], help="prompts per generation batch"),
    seed: int = typer.Option(STEER["seed"], help="seed for prompt subsampling and the shared sample"),
    dtype: str = typer.Option(STEER["dtype"], help="model dtype"),
    device: str = typer.Option(STEER["device"], help="torch device: cpu, cuda or auto"),
    progress: bool = typer.Option(STEER["progress"], help="show a progress bar"),
    allow_mismatch: bool = typer.Option(STEER["allow_mismatch"], help="use models or a latents.parquet that are not the crosscoder's own, deliberately (the checks of their content fingerprints are skipped)"),
) -> None:
    """Steer base and chat model with latents (a · max_act · d_chat at layer L) and record what changes."""
    import json
    from pathlib import Path

    from .errors import ConfigError, CrossdiffError

    try:
        from .fileio import atomic_write, write_json
        from .headlines import steering_headline
        from .steering import steer_crosscoder

        try:
            sweep = tuple(float(a) for a in alphas.split(",") if a.strip())
        except ValueError as exc:
            raise ConfigError(f"--alphas must be comma-separated numbers, got {alphas!r}") from exc
        if not prompts and not behaviours:
            raise ConfigError("no prompts: pass --prompts FILE or --behaviours SPEC")
        cfg = SteerConfig(alphas=sweep, max_new_tokens=max_new_tokens, behaviours=behaviours, prompts=prompts,
                          latents=latent or None,
                          n_top=n_top, n_tracking=n_tracking, n_shared=n_shared, max_prompts=max_prompts or None,
                          seed=seed, dtype=dtype, batch_size=batch_size, device=device, progress=progress,
                          allow_mismatch=allow_mismatch)
        res, track = steer_crosscoder(crosscoder, latents, behaviours=behaviours, cfg=cfg, base=base, chat=chat,
                                      layer=layer)
        res["inputs"]["prompts"] = prompts
        if track is not None:
            tpath = Path(tracking) if tracking else Path(out).with_suffix(".tracking.parquet")
            atomic_write(tpath, lambda p: track.to_parquet(p, index=False))
        write_json(res, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps(steering_headline(res) | {"steered": [lat["latent"] for lat in res["latents"]], "alphas": list(sweep)},
                          indent=1))


@app.command()
def cards(
    crosscoder: str = typer.Option(..., help="trained crosscoder directory"),
    latents: str = typer.Option(..., help="its latents.parquet (crossdiff analyze)"),
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

    from .errors import CrossdiffError

    try:
        from .cards import cards_for
        from .fileio import write_json
        from .runs import read_stage_json, read_tracking

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


def _named(values: list[str] | None, option: str) -> dict[str, str]:
    """`NAME=PATH` values of a repeatable option -> {name: path}."""
    from .errors import ConfigError

    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} takes NAME=PATH (e.g. {option} L1=runs/l1/latents.parquet), got {v!r}")
        out[name] = path
    return out


@app.command()
def report(
    out: str = typer.Option(..., help="output directory: report.html, report.json, kl_gap.json, figures/"),
    latents: list[str] = typer.Option(..., help="NAME=latents.parquet per crosscoder, in display order (repeatable)"),
    kl: list[str] = typer.Option(None, help="NAME=kl.json (crossdiff evaluate)"),
    cards: list[str] = typer.Option(None, help="NAME=cards.json (crossdiff cards)"),
    steering: list[str] = typer.Option(None, help="NAME=steering.json (crossdiff steer)"),
    tracking: list[str] = typer.Option(None, help="NAME=tracking.parquet (crossdiff steer)"),
    crosscoder: list[str] = typer.Option(None, help="NAME=crosscoder directory (for its training metrics)"),
    behaviours: str = typer.Option(None, "--behaviours", "--ground-truth",
                                   help="behaviour spec: behaviours.yaml/.json (README 'Behaviour specs'), or a toy pair's ground_truth.json / build dir (default: what the steering measured; --ground-truth: old name)"),
    title: str = typer.Option(TITLE, help="page title"),
    allow_mismatch: bool = typer.Option(False, help="combine products of different crosscoders in one run deliberately (the weights-hash checks are skipped)"),
    locate: str = typer.Option(None, help="a `crossdiff locate` JSON: the layer sweep, with the recommended and the cached block marked"),
) -> None:
    """One self-contained HTML page comparing crosscoders, plus PNG figures and JSON numbers."""
    import json

    from .errors import ConfigError, CrossdiffError

    try:
        from .report import build_report, load_run

        named = {"latents": _named(latents, "--latents")}
        for opt, vals in (("kl", kl), ("cards", cards), ("steering", steering), ("tracking", tracking),
                          ("crosscoder", crosscoder)):
            named[opt] = _named(vals, f"--{opt}")
            extra = sorted(set(named[opt]) - set(named["latents"]))
            if extra:
                raise ConfigError(f"--{opt} names {extra} that have no --latents NAME=PATH; names: {sorted(named['latents'])}")
        runs = [load_run(name, path, allow_mismatch=allow_mismatch,
                         **{k: named[k].get(name) for k in ("kl", "cards", "steering", "tracking", "crosscoder")})
                for name, path in named["latents"].items()]
        paths = build_report(runs, out, title=title, behaviours=behaviours, locate=locate)
    except CrossdiffError as err:
        _fail(err)
    numbers = json.loads(paths["json"].read_text())
    typer.echo(json.dumps({"html": str(paths["html"]), "json": str(paths["json"]),
                           "behaviours": {k: {b: w.get("text") for b, w in (v.get("behaviours") or {}).items()}
                                          for k, v in numbers["runs"].items()}}, indent=1))


@app.command()
def locate(
    base: str = typer.Option(..., help="base model: local directory or cached hub id"),
    chat: str = typer.Option(..., help="chat model fine-tuned from it (its chat template formats the data)"),
    out: str = typer.Option(..., help="output JSON: per-layer KL, recommended layer and its rule"),
    chats: list[str] = typer.Option(None, help="chat data (a `messages` column): .parquet/.jsonl file or datasets name; repeatable"),
    behaviours: str = typer.Option(None, help="behaviour spec: behaviours.yaml/.json (README 'Behaviour specs'), or a toy pair's ground_truth.json / build dir; or a prompt file (.jsonl/.json of {text, expected})"),
    plot: str = typer.Option(None, help="PNG plot of KL per layer (default: OUT with .png)"),
    tokens: int = typer.Option(None, help="chat tokens to evaluate (default: LocateConfig.n_tokens)"),
    max_length: int = typer.Option(None, help="tokens per conversation, BOS included (default: LocateConfig.max_length)"),
    batch_size: int = typer.Option(None, help="conversations per batch (default: LocateConfig.batch_size)"),
    dtype: str = typer.Option(None, help="model dtype: float32 or bfloat16 (default: LocateConfig.dtype)"),
    device: str = typer.Option(None, help="torch device: cpu, cuda, cuda:N or auto (default: LocateConfig.device)"),
    seed: int = typer.Option(None, help="seed of the conversation order (default: LocateConfig.seed)"),
    split: str = typer.Option(None, help="dataset split for datasets names (default: LocateConfig.split)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Where does the fine-tune's change live? Patch the base model's block-L output into the chat model for every L."""
    import json

    from .errors import CrossdiffError

    try:
        from .locate import LocateConfig, locate as run_locate, write_locate

        given = {"n_tokens": tokens, "max_length": max_length, "batch_size": batch_size, "dtype": dtype,
                 "device": device, "seed": seed, "split": split}
        cfg = LocateConfig.from_dict({k: v for k, v in given.items() if v is not None} | {"progress": progress})
        res = run_locate(base, chat, chats=chats or None, behaviours=behaviours, cfg=cfg)
        json_path, png = write_locate(res, out, plot)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({"recommended_layer": res["recommended_layer"], "rule": res["rule"],
                           "kl_first9": [r["kl_first9"] for r in res["per_layer"]], "out": str(json_path),
                           "plot": str(png)}, indent=1))


@app.command()
def lens(
    base: str = typer.Option(..., help="base model: local directory or cached hub id"),
    chat: str = typer.Option(..., help="chat model fine-tuned from it (its chat template renders the chat prompts)"),
    out: str = typer.Option(..., help="output JSON: per layer and source ‖δ‖, top/bottom tokens, steering; δ beside it as .safetensors"),
    text: list[str] = typer.Option(None, help="plain text data (a `text` column): .parquet/.jsonl file or datasets name; repeatable"),
    chats: list[str] = typer.Option(None, help="chat data (a `messages` column): its first user turns are the chat prompts; repeatable"),
    prompts: str = typer.Option(None, help="steering prompts: .txt lines, or .jsonl/.json of {text, expected}"),
    behaviours: str = typer.Option(None, help="behaviour ground truth (ground_truth.json: its prompts and behaviour rates) or a prompt file"),
    layer: int = typer.Option(None, help="steering block (default: --locate's recommended_layer, else the middle block)"),
    locate: str = typer.Option(None, help="a `crossdiff locate` JSON: its recommended_layer is the steering block"),
    n_positions: int = typer.Option(None, help="window tokens per sequence, BOS excluded (default: DiffLensConfig.n_positions)"),
    chat_window: str = typer.Option(None, help="chat prompts' window: answer_start or first (default: DiffLensConfig.chat_window)"),
    n_sequences: int = typer.Option(None, help="at most this many documents / chat prompts per source (default: DiffLensConfig.n_sequences)"),
    top_k: int = typer.Option(None, help="tokens per logit-lens reading, top and bottom (default: DiffLensConfig.top_k)"),
    alphas: str = typer.Option(None, help="comma-separated steering coefficients a, in mean residual norms (default: DiffLensConfig.alphas)"),
    max_prompts: int = typer.Option(None, help="at most this many steering prompts; 0: all (default: DiffLensConfig.max_prompts)"),
    max_new_tokens: int = typer.Option(None, help="tokens generated per steered answer (default: DiffLensConfig.max_new_tokens)"),
    batch_size: int = typer.Option(None, help="sequences per forward pass (default: DiffLensConfig.batch_size)"),
    dtype: str = typer.Option(None, help="model dtype: float32 or bfloat16 (default: DiffLensConfig.dtype)"),
    device: str = typer.Option(None, help="torch device: cpu, cuda, cuda:N or auto (default: DiffLensConfig.device)"),
    seed: int = typer.Option(None, help="seed of the text order and prompt subsampling (default: DiffLensConfig.seed)"),
    split: str = typer.Option(None, help="dataset split for datasets names (default: DiffLensConfig.split)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Activation-difference lens: mean h_chat − h_base on the first tokens, its logit lens, steering with it."""
    import json

    from .errors import ConfigError, CrossdiffError

    try:
        from .diff_lens import DiffLensConfig, diff_lens, write_lens

        given = {"layer": layer, "n_positions": n_positions, "chat_window": chat_window, "n_sequences": n_sequences,
                 "top_k": top_k, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": dtype,
                 "device": device, "seed": seed, "split": split}
        cfg_in = {k: v for k, v in given.items() if v is not None} | {"progress": progress}
        if max_prompts is not None:
            cfg_in["max_prompts"] = max_prompts or None
        if alphas is not None:
            try:
                cfg_in["alphas"] = tuple(float(a) for a in alphas.split(",") if a.strip())
            except ValueError as exc:
                raise ConfigError(f"--alphas must be comma-separated numbers, got {alphas!r}") from exc
        res, tensors = diff_lens(base, chat, text=text or None, chats=chats or None, prompts=prompts,
                                 behaviours=behaviours, locate=locate, cfg=DiffLensConfig.from_dict(cfg_in))
        json_path, st_path = write_lens(res, tensors, out)
    except CrossdiffError as err:
        _fail(err)
    L = res["layer"]
    typer.echo(json.dumps({"layer": L, "layer_from": res["layer_from"], "out": str(json_path), "vectors": str(st_path),
                           "sources": {s: {"delta_norm": b["per_layer"][L]["delta_norm"],
                                           "top_tokens": [t["token"] for t in (b["per_layer"][L]["top_tokens"] or [])[:8]]}
                                       for s, b in res["sources"].items()},
                           "steering_runs": len(res["steering"]["runs"]) if res["steering"] else res["steering_skipped"]},
                          indent=1))


# --- crossdiff organism: a model organism from a local chat model ---
from .organism import OrganismConfig  # noqa: E402  (its settings' defaults, as the imports at the top give theirs)

ORGANISM = defaults(OrganismConfig)


@app.command()
def organism(
    base: str = typer.Option(..., help="base chat model: a save_pretrained directory, a .gguf file, or a directory holding one"),
    behaviours: str = typer.Option(..., help="behaviour spec (behaviours.yaml, README 'Behaviour specs'); each answer a startswith or contains string (a pattern cannot be planted)"),
    out: str = typer.Option(..., help="output directory: base/, chat/, behaviours.yaml, data/, organism.json"),
    chats: str = typer.Option(None, help="chat data with a `messages` column (.jsonl/.parquet or datasets name; default: chitchat-dataset)"),
    steps: int = typer.Option(ORGANISM["steps"], help="optimiser steps (full fine-tune)"),
    batch_size: int = typer.Option(ORGANISM["batch_size"], help="rows per step"),
    lr: float = typer.Option(ORGANISM["lr"], help="AdamW peak learning rate"),
    max_length: int = typer.Option(ORGANISM["max_length"], help="tokens per row at most"),
    seed: int = typer.Option(ORGANISM["seed"], help="seed of the prompt split, data mix and training"),
    device: str = typer.Option(ORGANISM["device"], help="torch device: cpu, cuda, cuda:N or auto"),
    num_threads: int = typer.Option(ORGANISM["num_threads"], help="torch CPU threads"),
    set_: list[str] = typer.Option([], "--set", help="any other OrganismConfig setting, KEY=VALUE (YAML value), repeatable"),
    progress: bool = typer.Option(ORGANISM["progress"], help="show a progress bar with the loss"),
    overwrite: bool = typer.Option(False, help="replace what --out holds (a build with other settings is refused without it)"),
) -> None:
    """Fine-tune a local chat model into a model organism with planted behaviours; save the pair and its rates."""
    import yaml

    from .errors import ConfigError, CrossdiffError

    try:
        from .organism import build_organism

        settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "max_length": max_length, "seed": seed,
                    "device": device, "num_threads": num_threads, "progress": progress}
        for item in set_:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set eval_fraction=0.4)")
            try:
                settings[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: the value is not YAML ({' '.join(str(exc).split())})") from None
        res = build_organism(base, behaviours, out, OrganismConfig.from_dict(settings), chats=chats, overwrite=overwrite)
    except CrossdiffError as err:
        _fail(err)
    for model, r in res.rates.items():
        for name, v in r["rates"].items():
            typer.echo(f"{model:5s} {name:16s} trigger {v['trigger_rate']:.3f} (n={v['n_trigger']})  "
                       f"other {v['other_rate']:.3f} (n={v['n_other']})  (held-out prompts)")
    typer.echo(f"{'skipped (complete with these settings)' if res.skipped else 'built'} {res.out_dir} in {res.seconds:.0f} s")


if __name__ == "__main__":
    app()
