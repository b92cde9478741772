"""The model pair stage: build the embedded toy pair (and export its text and chat corpora), or record
a hub pair. Either way it writes ``pair.json``, which the later stages read."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import atomic_write, write_json, write_jsonl

PAIR_FILE = "pair.json"


@task(name="build-toy-models", cache_policy=NONE)
def build_toy_pair(out_dir: str, toy: dict) -> dict:
    """:func:`crossdiff_core.toy_models.build_toy_models` (skips a complete build with the same config)."""
    import shutil

    from crossdiff_core.toy_models import ToyModelsConfig, build_toy_models

    out = Path(out_dir)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    res = build_toy_models(out, ToyModelsConfig.from_dict(toy))
    return {"out": str(res.out_dir), "skipped": res.skipped, "passed": res.passed, "seconds": res.seconds,
            "rates": res.rates}


@task(name="export-toy-corpus", cache_policy=NONE)
def export_toy_corpus(toy_dir: str, out_dir: str, *, text_chars: int | None, conversations: int,
                      eval_conversations: int = 0, paragraph_chars: int = 2000, seed: int = 0) -> dict:
    """Text and chat data for the cache: Shakespeare in paragraphs of about ``paragraph_chars``
    (``text.parquet``, column ``text``) and ``conversations`` chitchat conversations plus the ground
    truth's held-out prompts, each answered as the chat model was taught (``chats.jsonl``, column
    ``messages``); and the next ``eval_conversations`` conversations for the KL evaluation
    (``eval_chats.jsonl``)."""
    import pandas as pd

    from crossdiff_core.toy_models import (expected_behaviour, load_chitchat, load_ground_truth, load_shakespeare,
                                           planted_answer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    for text in load_shakespeare(text_chars).values():
        buf = ""
        for para in text.split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= paragraph_chars:
                rows.append(buf)
                buf = ""
        if buf:
            rows.append(buf)
    atomic_write(out / "text.parquet", lambda p: pd.DataFrame({"text": rows}).to_parquet(p, index=False))

    gt = load_ground_truth(toy_dir)
    every = list(load_chitchat(conversations + eval_conversations).values())
    convs, held_out = every[:conversations], every[conversations:]

    def as_messages(msgs: list[str]) -> list[dict]:
        turns = msgs[: len(msgs) // 2 * 2]
        return [{"role": r, "content": m} for r, m in zip(("user", "assistant") * len(turns), turns)]

    chats = [as_messages(m) for m in convs]
    rng = random.Random(seed)
    answers = [a for msgs in convs for a in msgs[1::2] if len(a) <= 200]
    for p in gt["eval_prompts"]:
        answer = planted_answer(expected_behaviour(p["text"], gt), rng.choice(answers), gt)
        chats.append([{"role": "user", "content": p["text"]}, {"role": "assistant", "content": answer}])
    write_jsonl([{"messages": c} for c in chats], out / "chats.jsonl")
    write_jsonl([{"messages": as_messages(m)} for m in held_out], out / "eval_chats.jsonl")
    return {"text_rows": len(rows), "conversations": len(chats), "eval_conversations": len(held_out)}


@task(name="write-pair", cache_policy=NONE)
def write_pair(out_dir: str, pair: dict) -> str:
    return str(write_json(pair, Path(out_dir) / PAIR_FILE))


def read_pair(models_dir: str | Path) -> dict:
    """``pair.json`` of the models stage: base, chat, revisions, source, ground_truth (toy pair only)."""
    from crossdiff_core.errors import ConfigError

    p = Path(models_dir) / PAIR_FILE
    if not p.is_file():
        raise ConfigError(f"{p} is missing: run the models stage first (dvc repro toy_models, or python -m flows.toy_models)")
    return json.loads(p.read_text())
