"""The model pair stage: build the embedded toy pair (and export its text and chat corpora), or record
a hub pair. Either way it writes ``pair.json``, which the later stages read."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json

PAIR_FILE = "pair.json"


@task(name="build-toy-models", cache_policy=NONE)
def build_toy_pair(out_dir: str, toy: dict) -> dict:
    """:func:`crossdiff_core.toy.build_toy_models` (skips a complete build with the same config)."""
    import shutil

    from crossdiff_core.toy import ToyModelsConfig, build_toy_models

    out = Path(out_dir)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    res = build_toy_models(out, ToyModelsConfig.from_dict(toy), progress=True)
    return {"out": str(res.out_dir), "skipped": res.skipped, "passed": res.passed, "seconds": res.seconds,
            "rates": res.rates}


@task(name="export-toy-corpus", cache_policy=NONE)
def export_toy_corpus(toy_dir: str, out_dir: str, corpus: dict | None) -> dict:
    """:func:`crossdiff_core.toy.export_corpus`: text.parquet, chats.jsonl, eval_chats.jsonl."""
    from dataclasses import asdict

    from crossdiff_core.toy import export_corpus
    from crossdiff_core.toy.config import CorpusConfig

    return export_corpus(toy_dir, out_dir, **asdict(CorpusConfig.from_dict(corpus)))


@task(name="write-pair", cache_policy=NONE)
def write_pair(out_dir: str, pair: dict) -> str:
    return str(write_json(pair, Path(out_dir) / PAIR_FILE))


def read_pair(models_dir: str | Path) -> dict:
    """``pair.json`` of the models stage: base, chat, revisions, source, ground_truth (toy pair only) and
    behaviours (the spec the later stages use: ``models.behaviours``, else the toy pair's ground truth)."""
    from crossdiff_core.errors import ConfigError

    p = Path(models_dir) / PAIR_FILE
    if not p.is_file():
        raise ConfigError(f"{p} is missing: run the models stage first (dvc repro toy_models, or python -m flows.toy_models)")
    return json.loads(p.read_text())
