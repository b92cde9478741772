"""`crossdiff toy-models`, `organism`, `locate`, `lens`: build a model pair, and look at it before caching."""

from __future__ import annotations

import typer

from .common import ORGANISM, OrganismConfig, _alphas, _apply_sets, _fail, _progress_opt, app


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

    from ..errors import ConfigError, CrossdiffError
    from ..toy import ToyModelsConfig, build_toy_models

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
        _apply_sets(settings, set_, "finetune_steps=300")
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
    from ..errors import CrossdiffError

    try:
        from ..organism import build_organism

        settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "max_length": max_length, "seed": seed,
                    "device": device, "num_threads": num_threads, "progress": progress}
        _apply_sets(settings, set_, "eval_fraction=0.4")
        res = build_organism(base, behaviours, out, OrganismConfig.from_dict(settings), chats=chats, overwrite=overwrite)
    except CrossdiffError as err:
        _fail(err)
    for model, r in res.rates.items():
        for name, v in r["rates"].items():
            typer.echo(f"{model:5s} {name:16s} trigger {v['trigger_rate']:.3f} (n={v['n_trigger']})  "
                       f"other {v['other_rate']:.3f} (n={v['n_other']})  (held-out prompts)")
    typer.echo(f"{'skipped (complete with these settings)' if res.skipped else 'built'} {res.out_dir} in {res.seconds:.0f} s")


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
    progress: bool = _progress_opt(),
) -> None:
    """Where does the fine-tune's change live? Patch the base model's block-L output into the chat model for every L."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..locate import LocateConfig, locate as run_locate, write_locate

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
    progress: bool = _progress_opt(),
) -> None:
    """Activation-difference lens: mean h_chat − h_base on the first tokens, its logit lens, steering with it."""
    import json

    from ..errors import CrossdiffError

    try:
        from ..diff_lens import DiffLensConfig, diff_lens, write_lens

        given = {"layer": layer, "n_positions": n_positions, "chat_window": chat_window, "n_sequences": n_sequences,
                 "top_k": top_k, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "dtype": dtype,
                 "device": device, "seed": seed, "split": split}
        cfg_in = {k: v for k, v in given.items() if v is not None} | {"progress": progress}
        if max_prompts is not None:
            cfg_in["max_prompts"] = max_prompts or None
        if alphas is not None:
            cfg_in["alphas"] = _alphas(alphas)
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
