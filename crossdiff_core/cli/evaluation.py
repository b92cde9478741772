"""`crossdiff evaluate`, `steer`, `scoreboard`, `report`: what the latents do to the models, and the page comparing crosscoders."""

from __future__ import annotations

import typer

from .common import (EVALUATE, SCOREBOARD, STEER, TITLE, EvaluateConfig, SteerConfig, _alphas, _allow_mismatch_opt, _base_opt,
                     _chat_opt, _crosscoder_opt, _fail, _latents_opt, _layer_opt, _named, app)


@app.command()
def evaluate(
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
    chats: list[str] = typer.Option(..., help="held-out chat data (a `messages` column): .parquet/.jsonl file or datasets name; repeatable"),
    out: str = typer.Option(..., help="output JSON: KL and % of the gap closed per patch set and token group"),
    base: str = _base_opt(),
    chat: str = _chat_opt(),
    layer: int = _layer_opt(),
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
    allow_mismatch: bool = _allow_mismatch_opt(EVALUATE["allow_mismatch"]),
) -> None:
    """KL-gap patching: how much of the chat model's behaviour each set of latents carries."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..fileio import write_json
        from ..kl_eval import evaluate_crosscoder

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
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
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
    base: str = _base_opt(),
    chat: str = _chat_opt(),
    layer: int = _layer_opt(),
    batch_size: int = typer.Option(STEER["batch_size"], help="prompts per generation batch"),
    seed: int = typer.Option(STEER["seed"], help="seed for prompt subsampling and the shared sample"),
    dtype: str = typer.Option(STEER["dtype"], help="model dtype"),
    device: str = typer.Option(STEER["device"], help="torch device: cpu, cuda or auto"),
    progress: bool = typer.Option(STEER["progress"], help="show a progress bar"),
    allow_mismatch: bool = _allow_mismatch_opt(STEER["allow_mismatch"]),
) -> None:
    """Steer base and chat model with latents (a · max_act · d_chat at layer L) and record what changes."""
    import json
    from pathlib import Path

    from ..errors import ConfigError, CrossdiffError

    try:
        from ..fileio import atomic_write, write_json
        from ..headlines import steering_headline
        from ..steering import steer_crosscoder

        sweep = _alphas(alphas)
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
def scoreboard(
    crosscoder: list[str] = typer.Option(..., help="NAME=crosscoder directory per crosscoder (repeatable; all from one cache)"),
    latents: list[str] = typer.Option(..., help="NAME=latents.parquet for each --crosscoder NAME (crossdiff analyze)"),
    behaviours: str = typer.Option(..., help="behaviour spec: behaviours.yaml/.json (README 'Behaviour specs') or a toy pair's ground_truth.json"),
    chats: list[str] = typer.Option(..., help="held-out chat data (a `messages` column): the KL gap, and the lens's chat prompts; repeatable"),
    out: str = typer.Option(..., help="output JSON: every method's scores (FILE.lens.json and .safetensors: the lens it scored)"),
    text: list[str] = typer.Option(None, help="plain-text data (a `text` column) for the lens; repeatable"),
    base: str = _base_opt(),
    chat: str = _chat_opt(),
    layer: int = _layer_opt(),
    n_directions: int = typer.Option(SCOREBOARD["n_directions"], help="N: each method's top-N directions"),
    alphas: str = typer.Option(",".join(f"{a:g}" for a in SCOREBOARD["alphas"]), help="comma-separated steering scales a (x --steer-unit)"),
    steer_unit: str = typer.Option(SCOREBOARD["steer_unit"], help="the steering scale r: spread (RMS distance of a token's block activation from the mean) or norm (mean norm)"),
    max_prompts: int = typer.Option(SCOREBOARD["max_prompts"], help="behaviour prompts used (each behaviour keeps its share); 0: all"),
    max_new_tokens: int = typer.Option(SCOREBOARD["max_new_tokens"], help="tokens generated per steered answer"),
    tokens: int = typer.Option(EVALUATE["tokens"], help="conversation tokens of the KL gap"),
    max_length: int = typer.Option(EVALUATE["max_length"], help="tokens per conversation, BOS included"),
    seed: int = typer.Option(SCOREBOARD["seed"], help="seed of the random directions and the prompt subsample"),
    batch_size: int = typer.Option(SCOREBOARD["batch_size"], help="prompts per batch"),
    dtype: str = typer.Option(SCOREBOARD["dtype"], help="model dtype"),
    device: str = typer.Option(SCOREBOARD["device"], help="torch device: cpu, cuda or auto"),
    progress: bool = typer.Option(SCOREBOARD["progress"], help="show progress bars"),
) -> None:
    """Score every method (each crosscoder by Δnorm and by ν, the activation-difference lens, random directions)
    the same way against known behaviours: detection AUROC, steering of the base and chat model, KL gap closed."""
    import json
    from pathlib import Path

    from ..errors import ConfigError, CrossdiffError

    try:
        from ..diff_lens import write_lens
        from ..fileio import write_json
        from ..scoreboard import ScoreboardConfig, build_scoreboard, headline

        ccs, lats = _named(crosscoder, "--crosscoder"), _named(latents, "--latents")
        if set(ccs) != set(lats):
            raise ConfigError(f"--crosscoder names {sorted(ccs)} and --latents names {sorted(lats)} must be the same")
        cfg = ScoreboardConfig(n_directions=n_directions, alphas=_alphas(alphas), steer_unit=steer_unit,
                               max_prompts=max_prompts or None,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, dtype=dtype,
                               device=device, progress=progress)
        ev = EvaluateConfig(chats=list(chats), tokens=tokens, max_length=max_length, seed=seed, dtype=dtype,
                            device=device, progress=progress)
        board, lens, tensors = build_scoreboard({k: (ccs[k], lats[k]) for k in ccs}, behaviours=behaviours,
                                                evaluate=ev, text=list(text or []), cfg=cfg, base=base, chat=chat,
                                                layer=layer)
        if lens:
            write_lens(lens, tensors, Path(out).with_suffix(".lens.json"))
        write_json(board, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps(headline(board), indent=1))


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
    scoreboard: str = typer.Option(None, help="a `crossdiff scoreboard` JSON: the Scoreboard section"),
) -> None:
    """One self-contained HTML page comparing crosscoders, plus PNG figures and JSON numbers."""
    import json

    from ..errors import ConfigError, CrossdiffError

    try:
        from ..report.inputs import load_run
        from ..report.page import build_report

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
        paths = build_report(runs, out, title=title, behaviours=behaviours, locate=locate, scoreboard=scoreboard)
    except CrossdiffError as err:
        _fail(err)
    numbers = json.loads(paths["json"].read_text())
    typer.echo(json.dumps({"html": str(paths["html"]), "json": str(paths["json"]),
                           "behaviours": {k: {b: w.get("text") for b, w in (v.get("behaviours") or {}).items()}
                                          for k, v in numbers["runs"].items()}}, indent=1))
