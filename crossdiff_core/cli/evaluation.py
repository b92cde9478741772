"""`crossdiff evaluate`, `steer`, `scoreboard`, `report`: what the latents do to the models, and the page comparing crosscoders."""

from __future__ import annotations

import typer

from .common import (EVALUATE, SCOREBOARD, STEER, TITLE, EvaluateConfig, ScoreboardConfig, SteerConfig, _alphas, _base_opt,
                     _chat_opt, _crosscoder_opt, _fail, _latents_opt, _layer_opt, _named, app)
from .options import Spec, config_options

# the settings whose command-line form differs (a comma list, 0 for "all", a repeatable --latent) are the
# commands' own options
EVALUATE_OPTIONS = Spec(EvaluateConfig, exclude=("chats",))
STEER_OPTIONS = Spec(SteerConfig, exclude=("alphas", "models", "latents", "behaviours", "prompts", "max_prompts"))
SCOREBOARD_OPTIONS = Spec(ScoreboardConfig, exclude=("rankings", "readings", "alphas", "models", "max_prompts"))


@app.command()
@config_options(EVALUATE_OPTIONS)
def evaluate(
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
    chats: list[str] = typer.Option(..., help="held-out chat data (a `messages` column): .parquet/.jsonl file or datasets name; repeatable"),
    out: str = typer.Option(..., help="output JSON: KL and % of the gap closed per patch set and token group"),
    base: str = _base_opt(),
    chat: str = _chat_opt(),
    layer: int = _layer_opt(),
    **settings,
) -> None:
    """KL-gap patching: how much of the chat model's behaviour each set of latents carries."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..fileio import write_json
        from ..kl_eval import evaluate_crosscoder

        cfg = EVALUATE_OPTIONS.build(settings, chats=list(chats))
        d = evaluate_crosscoder(crosscoder, latents, cfg, base=base, chat=chat, layer=layer)
        write_json(d, out)
    except CrossdiffError as err:
        _fail(err)
    typer.echo(json.dumps({r["name"]: r["gap_closed"] for r in d["sets"] if not r["group"]} | {
        f"{g} (mean)": v["gap_closed_mean"] for g, v in d["groups"].items()}, indent=1))


@app.command()
@config_options(STEER_OPTIONS)
def steer(
    crosscoder: str = _crosscoder_opt(),
    latents: str = _latents_opt(),
    out: str = typer.Option(..., help="output JSON: generations, KL and behaviour rates per latent, model and a"),
    behaviours: str = typer.Option(STEER["behaviours"], "--behaviours", "--ground-truth",
                                   help="behaviour spec: behaviours.yaml/.json (README 'Behaviour specs'), or a toy pair's ground_truth.json / build dir: tracking, behaviour rates and default prompts (--ground-truth: old name)"),
    prompts: str = typer.Option(None, help="prompt file (.txt lines, or .jsonl/.json with `text`); default: the behaviour spec's"),
    latent: list[int] = typer.Option(None, help="latents to steer (repeatable); default: chosen by ν rank, tracking and a shared sample"),
    alphas: str = typer.Option(",".join(f"{a:g}" for a in STEER["alphas"]), help="comma-separated steering coefficients a"),
    max_prompts: int = typer.Option(STEER["max_prompts"] or 0, help="use at most this many prompts (each behaviour keeps its share); 0: all"),
    tracking: str = typer.Option(None, help="behaviour-tracking table output (default: OUT with .tracking.parquet)"),
    base: str = _base_opt(),
    chat: str = _chat_opt(),
    layer: int = _layer_opt(),
    **settings,
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
        cfg = STEER_OPTIONS.build(settings, alphas=sweep, behaviours=behaviours, prompts=prompts, latents=latent or None,
                                  max_prompts=max_prompts or None)
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
@config_options(SCOREBOARD_OPTIONS)
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
    alphas: str = typer.Option(",".join(f"{a:g}" for a in SCOREBOARD["alphas"]), help="comma-separated steering scales a (x --steer-unit)"),
    max_prompts: int = typer.Option(SCOREBOARD["max_prompts"] or 0, help="behaviour prompts used (each behaviour keeps its share); 0: all"),
    tokens: int = typer.Option(EVALUATE["tokens"], help="conversation tokens of the KL gap"),
    max_length: int = typer.Option(EVALUATE["max_length"], help="tokens per conversation, BOS included"),
    **settings,
) -> None:
    """Score every method (each crosscoder by Δnorm and by ν, the activation-difference lens, random directions)
    the same way against known behaviours: detection AUROC, steering of the base and chat model, KL gap closed."""
    import json
    from pathlib import Path

    from ..errors import ConfigError, CrossdiffError

    try:
        from ..diff_lens import write_lens
        from ..fileio import write_json
        from ..scoreboard import build_scoreboard, headline

        ccs, lats = _named(crosscoder, "--crosscoder"), _named(latents, "--latents")
        if set(ccs) != set(lats):
            raise ConfigError(f"--crosscoder names {sorted(ccs)} and --latents names {sorted(lats)} must be the same")
        cfg = SCOREBOARD_OPTIONS.build(settings, alphas=_alphas(alphas), max_prompts=max_prompts or None)
        ev = EvaluateConfig(chats=list(chats), tokens=tokens, max_length=max_length, seed=cfg.seed, dtype=cfg.dtype,
                            device=cfg.device, progress=cfg.progress)
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
