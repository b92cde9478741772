"""Greedy chat generation with whatever forward hooks are registered on the model (steering adds its
vector through one): single-turn user prompts rendered with the tokenizer's chat template, the assistant
turn opened, batched with left padding so that every row's answer starts at the same position."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .data import render_chat
from .errors import ConfigError


def render_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of single-turn user ``prompts`` in the chat template, the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template: prompts are rendered as chats; "
                          "use the chat model's tokenizer")
    texts = render_chat(tokenizer, [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True)
    return [list(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask``, each ``[batch, T]`` int64 on ``device``, rows padded on the left."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask``, each ``[batch, T]`` int64 on the CPU, rows padded on the right (positions
    match those of the rows alone, as the cache has them)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its end-of-sequence id, else 0 (padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.inference_mode()
def generate_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 20,
                   batch_size: int = 64) -> list[str]:
    """Greedy answers to single-turn user ``prompts`` (chat template, left padding), any hooks active.
    Stops at the model's end-of-sequence tokens (its generation config, else the tokenizer's)."""
    device = next(model.parameters()).device
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    rows, out = render_prompts(tokenizer, prompts), []
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    for a in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[a:a + batch_size], pad, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(eos_set) or None, pad_token_id=pad)
        for r in gen[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(r) if t in eos_set), len(r))
            out.append(tokenizer.decode(r[:cut], skip_special_tokens=True))
    model.train(was_training)
    return out
