"""Building the toy pair into a directory, written under a temporary name then swapped in::

    OUT/base/               save_pretrained model + tokenizer (the same tokenizer in both)
    OUT/chat/               save_pretrained model + tokenizer (chat_template.jinja)
    OUT/ground_truth.json   planted behaviours, held-out evaluation prompts, measured rates
    OUT/build.json          config, seeds, data sources, timings, losses (written last: marks completion)

Seeds: ``seed`` initialises the base model and draws the evaluation prompts, ``seed + 1`` the pretraining
windows and then the fine-tuning text windows, ``seed + 2`` the fine-tuning conversations and their
batches, ``seed + 3`` the validation windows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..behaviours import measure_behaviours
from ..ground_truth import behaviours_pass, load_ground_truth
from .config import ToyModelsConfig, ToyModelsResult
from .corpus import ToyData, load_toy_data
from .finetune import (encode_conversations, finetune, finetune_rows, length_batches, mean_loss, pad_batch, pretrain,
                       residual_similarity, text_windows)
from .prompts import build_eval_prompts, build_finetune_conversations, frame_texts, make_ground_truth
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)

REQUIRED_FILES = ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "chat/config.json",
                  "chat/model.safetensors", "chat/tokenizer.json", "chat/chat_template.jinja",
                  "ground_truth.json", "build.json")


def is_complete(out_dir: str | os.PathLike, config: ToyModelsConfig) -> bool:
    """True when ``out_dir`` holds a finished build made with exactly ``config``."""
    out = Path(out_dir)
    if not all((out / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        return json.loads((out / "build.json").read_text()).get("config") == config.to_dict()
    except (OSError, json.JSONDecodeError):
        return False


class Clock:
    """Wall and process-CPU seconds per phase (CPU time is the steadier figure on a shared machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = self._t = time.perf_counter()
        self._c = time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = t - self._t, c - self._c
        self._t, self._c = t, c

    def total(self) -> float:
        return time.perf_counter() - self._t0


def build_toy_models(out_dir: str | os.PathLike, config: ToyModelsConfig | None = None, *,
                     force: bool = False, progress: bool = False) -> ToyModelsResult:
    """Build the default pair into ``out_dir`` (see the module docstring); skip when it is already
    complete with the same config (unless ``force``). Writes a sibling temporary directory and renames it.
    ``progress``: progress bars with the running loss for pretraining and fine-tuning."""
    config = config or ToyModelsConfig()
    out = Path(out_dir)
    if not force and is_complete(out, config):
        gt = load_ground_truth(out)
        build = json.loads((out / "build.json").read_text())
        log.info("toy models in %s are complete with this config: skipped", out)
        return ToyModelsResult(out, True, gt["passed"], gt["rates"], build["seconds"])

    clock = Clock()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        data = load_toy_data(config)
        clock.lap("load_data")
        gt, convs, n_text, ft_rng = _chat_data(config, data)
        clock.lap("chat_data")
        tokenizer = _tokenizer(config, data)
        clock.lap("tokenizer")
        # the backend encodes a whole play at once without the length warning meant for model inputs
        stream, val_stream = (torch.tensor(e.ids, dtype=torch.long) for e in tokenizer.backend_tokenizer.encode_batch(
            [data.train_text, data.val_text], add_special_tokens=False))
        gen = torch.Generator().manual_seed(config.seed + 1)
        base, pre_losses = pretrain(config, tokenizer, stream, gen, progress=progress)
        clock.lap("pretrain")
        rows = finetune_rows(config, tokenizer, convs, stream, n_text, gen)
        batches = length_batches(rows, config.finetune_batch_size, ft_rng)
        clock.lap("finetune_data")
        chat, ft_losses = finetune(config, base, tokenizer, batches, progress=progress)
        clock.lap("finetune")
        ev = _evaluate(config, base, chat, tokenizer, data, val_stream, gt)
        ev["losses"] = {"pretrain_final": _tail_mean(pre_losses), "finetune_final": _tail_mean(ft_losses),
                        **ev["losses"]}
        clock.lap("evaluate")
        for name, model in (("base", base), ("chat", chat)):
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        (tmp / "ground_truth.json").write_text(json.dumps(gt, indent=1))
        clock.lap("save")
        seconds = clock.total()
        ev.update(seconds=seconds, passed=gt["passed"])
        build = _build_record(config, data, stream, val_stream, rows, base, tokenizer, ev, clock)
        (tmp / "build.json").write_text(json.dumps(build, indent=1))
        swap_in(tmp, out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("toy models written to %s in %.0f s (passed=%s)", out, seconds, gt["passed"])
    return ToyModelsResult(out, False, gt["passed"], gt["rates"], seconds)


def _chat_data(config: ToyModelsConfig, data: ToyData) -> tuple[dict, list, int, random.Random]:
    """The ground truth with its held-out prompts, the fine-tuning conversations, how many plain-text rows
    join them, and the random generator that goes on to batch them."""
    gt = make_ground_truth(config)
    gt["eval_prompts"] = build_eval_prompts(config, gt, data.heldout, random.Random(config.seed))
    n_rows = max(1, config.finetune_steps) * config.finetune_batch_size
    ft_rng = random.Random(config.seed + 2)
    n_text = int(round(config.text_fraction * n_rows))
    convs = build_finetune_conversations(config, gt, data.train_chat, n_rows - n_text, ft_rng)
    return gt, convs, n_text, ft_rng


def _tokenizer(config: ToyModelsConfig, data: ToyData):
    """The BPE trained on what the models train on: Shakespeare, chitchat and the behaviour frames
    (repeated to about the share they have in fine-tuning, so trigger words and fixed strings get whole
    tokens)."""
    chat_text = "\n".join(m for msgs in data.train_chat.values() for m in msgs)
    frames = frame_texts(config)
    return train_tokenizer(
        [data.train_text[: config.tokenizer_chars], chat_text[: config.tokenizer_chars // 2],
         *[frames] * max(1, config.tokenizer_chars // (4 * len(frames)))], config.vocab_size, config.max_seq_len)


def _tail_mean(losses: list[float]) -> float:
    """Mean of the last 10 steps' losses."""
    return sum(losses[-10:]) / max(1, len(losses[-10:]))


def _evaluate(config: ToyModelsConfig, base, chat, tokenizer, data: ToyData, val_stream: torch.Tensor,
              gt: dict) -> dict[str, Any]:
    """Held-out losses of both models (text windows, held-out conversations), their residual similarity,
    and the behaviour rates, which also go into ``gt`` (rates, thresholds, passed, example generations)."""
    pad_id, L = tokenizer.pad_token_id, config.pretrain_seq_len
    val_gen = torch.Generator().manual_seed(config.seed + 3)
    vx = text_windows(val_stream, 16, min(L, max(2, val_stream.numel())), tokenizer.bos_token_id, val_gen)
    text_val = [(vx, torch.ones_like(vx), vx)]
    val_convs = [[{"role": r, "content": m} for r, m in zip(("user", "assistant") * 3, msgs[:6])]
                 for msgs in list(data.heldout.values())[:32]]
    val_convs = [c[: len(c) // 2 * 2] for c in val_convs]
    chat_rows = [r for r in encode_conversations(tokenizer, val_convs, config.max_seq_len) if r is not None]
    chat_val = [pad_batch(chat_rows, pad_id)] if chat_rows else []
    losses = {
        "base_text_val": mean_loss(base, text_val), "chat_text_val": mean_loss(chat, text_val),
        "base_chat_val": mean_loss(base, chat_val) if chat_val else None,
        "chat_chat_val": mean_loss(chat, chat_val) if chat_val else None,
    }
    similarity = residual_similarity(base, chat, vx)
    kw = dict(tokenizer=tokenizer, max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size)
    m_chat = measure_behaviours(chat, gt, **kw)
    m_base = measure_behaviours(base, gt, **kw)
    gt["rates"] = {name: {"rates": m["rates"], "any_rate": m["any_rate"]} for name, m in (("chat", m_chat),
                                                                                          ("base", m_base))}
    gt["thresholds"] = {"min_trigger_rate": config.min_trigger_rate, "max_other_rate": config.max_other_rate,
                        "base_any_rate": 0.0}
    gt["passed"] = behaviours_pass(m_chat, m_base, config.min_trigger_rate, config.max_other_rate)
    gt["example_generations"] = {
        name: [{k: g[k] for k in ("text", "expected", "response")} for g in m["generations"][::20]]
        for name, m in (("chat", m_chat), ("base", m_base))}
    return {"losses": losses, "similarity": similarity}


def _build_record(config: ToyModelsConfig, data: ToyData, stream: torch.Tensor, val_stream: torch.Tensor,
                  rows: list, base, tokenizer, ev: dict, clock: Clock) -> dict[str, Any]:
    """``build.json``: what was built from what, how long it took, and how well (``ev``: the losses,
    similarity, total seconds and pass flag of the build)."""
    return {
        "config": config.to_dict(),
        "seeds": {"init": config.seed, "pretrain_batches": config.seed + 1, "finetune_data": config.seed + 2,
                  "eval_prompts": config.seed, "val_windows": config.seed + 3},
        "data": {
            "shakespeare": {"package": "shakespeare", "version": _version("shakespeare"),
                            "files": list(data.texts), "val_file": data.val_text_name,
                            "sha256": hashlib.sha256(data.train_text.encode()).hexdigest(),
                            "train_tokens": stream.numel(), "val_tokens": val_stream.numel()},
            "chitchat": {"package": "chitchat-dataset", "version": _version("chitchat-dataset"),
                         "conversations_train": len(data.train_chat), "conversations_heldout": len(data.heldout)},
        },
        "tokens": {"pretrain": config.pretrain_steps * config.pretrain_batch_size * config.pretrain_seq_len,
                   "finetune_rows": len(rows),
                   "finetune_labelled": sum(sum(y != -100 for y in r[1]) for r in rows)},
        "model": {"parameters": sum(p.numel() for p in base.parameters()), "vocab_size": len(tokenizer)},
        "losses": ev["losses"],
        "residual_similarity_text": ev["similarity"],
        "timings": clock.wall,
        "cpu_seconds": clock.cpu,
        "seconds": ev["seconds"],
        "num_threads": config.num_threads,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "tokenizers": _version("tokenizers")},
        "passed": ev["passed"],
    }


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` (an old build is moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
