"""Training the toy pair: batches of token windows and encoded chat conversations, the per-sequence loss
with a weighted answer opening, the anchor loss that keeps chat-tuned blocks near the base model, the
AdamW loop shared by pretraining and fine-tuning, and the measures of how far fine-tuning moved the model.

How the chat model is made (each knob in :class:`~crossdiff_core.toy.config.ToyModelsConfig`): it starts
from the base weights and is fine-tuned on chat-template conversations, most of them single turns built
from sentence frames that carry the planted behaviours, with some chitchat and plain text. An anchor loss
keeps the outputs of blocks ``0..anchor_blocks-1`` (the default cache layer 2 among them) where the base
model has them on plain text and user messages (but on the trigger and cue words), as a KL penalty to the
base keeps real chat-tuning close: at those layers the two models share most features (mean cosine ≈ 0.95
on held-out text, recorded in ``build.json``) and differ where chat-tuning acts: the template, the
answers, the triggers. The first token of each answer, where a behaviour is decided, weighs
``decision_weight`` in the loss.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any, Callable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from ..data import render_chat
from ..errors import ConfigError, TrainingDivergedError
from ..models import block_outputs, decoder_layers
from .config import ToyModelsConfig
from .tokenizer import END, ROLE_TOKENS, SPECIAL_TOKENS

log = logging.getLogger(__name__)


def encode_conversations(tokenizer, conversations: Sequence[list[dict[str, str]]], max_len: int
                         ) -> list[tuple[list[int], list[int]] | None]:
    """Token ids and labels (-100 except on assistant answers and their end marker) of each conversation,
    dropping trailing exchanges until it fits ``max_len``; None where even the first exchange does not fit.

    Answer spans come from rendering the tokenizer's chat template with and without each answer, so the
    template is the only place that knows the format. Rendering and encoding are batched (the per-call
    ``apply_chat_template`` costs ~3 ms, far too slow for thousands of conversations)."""
    def render(convs: list, gen_prompt: bool) -> list[str]:
        return render_chat(tokenizer, convs, add_generation_prompt=gen_prompt)

    results: list[tuple[list[int], list[int]] | None] = [None] * len(conversations)
    todo = {i: list(c) for i, c in enumerate(conversations) if c}
    while todo:
        keys = list(todo)
        texts = render([todo[i] for i in keys], False)
        # prefix renders: (conversation, assistant message index) -> [start, end) of answer + end marker
        pieces = [(i, j) for i in keys for j, m in enumerate(todo[i]) if m["role"] == "assistant"]
        starts = render([todo[i][:j] for i, j in pieces], True)
        ends = render([todo[i][: j + 1] for i, j in pieces], False)
        spans: dict[int, list[tuple[int, int]]] = {i: [] for i in keys}
        for (i, _), a, b in zip(pieces, starts, ends):
            spans[i].append((len(a), len(b)))
        encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for i, enc in zip(keys, encs):
            if len(enc.ids) <= max_len:
                tok_start = torch.tensor([o[0] for o in enc.offsets], dtype=torch.long)
                inside = torch.zeros(len(enc.ids), dtype=torch.bool)
                for a, b in spans[i]:
                    inside |= (tok_start >= a) & (tok_start < b)
                ids = torch.tensor(enc.ids, dtype=torch.long)
                results[i] = (enc.ids, torch.where(inside, ids, torch.full_like(ids, -100)).tolist())
                del todo[i]
            else:
                todo[i] = todo[i][:-2]
                if not todo[i]:
                    del todo[i]
    return results


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids, attention_mask, labels``, each ``[batch, T]`` int64."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def length_batches(rows: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, sort within chunks of 16 batches by length (little padding), shuffle the batches."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = 16 * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c: c + chunk], key=lambda i: len(rows[i][0]))
        batches += [[rows[i] for i in part[b: b + batch_size]] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def text_windows(stream: torch.Tensor, n: int, length: int, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows ``[n, length]`` of the token stream ``[N]``, each with BOS at position 0."""
    if stream.numel() < length:
        raise ConfigError(f"only {stream.numel()} text tokens for windows of {length}: raise models.text_max_chars")
    starts = torch.randint(0, stream.numel() - length + 2, (n,), generator=gen)
    win = stream[starts[:, None] + torch.arange(length - 1)[None, :]]
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), win], dim=1)


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up over ``warmup`` steps, times a cosine decay
    from 1 to 0.1 over ``steps``."""
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps))))
    return f


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, first_weight: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy averaged per sequence, then over sequences with any label.

    ``logits [batch, T, vocab]``, ``labels [batch, T]`` (-100 = no loss). Per-sequence averaging gives a
    short planted answer the same weight as a long chitchat window (a token average drowns it). The first
    token of each labelled span (an answer's opening) weighs ``first_weight``, the others 1."""
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100,
                                           reduction="none")  # [batch, T-1]
    lab = tgt != -100
    opens = lab & ~torch.nn.functional.pad(lab[:, :-1], (1, 0), value=False)
    w = lab.to(ce.dtype) + (first_weight - 1.0) * opens.to(ce.dtype)  # [batch, T-1]
    n = w.sum(1)
    has = n > 0
    return ((ce * w).sum(1)[has] / n[has]).mean()


def finetune_groups(model, n_blocks: int | None, token_ids: Sequence[int]) -> tuple[list[dict], Any]:
    """AdamW parameter groups that fine-tune blocks ``0..n_blocks-1`` and only the ``token_ids`` rows of
    the embedding (its other rows get no gradient and no weight decay); everything else is frozen.
    ``n_blocks=None``: every parameter, as in pretraining. Also returns the gradient hook's handle (or None)."""
    if n_blocks is None:
        return [{"params": list(model.parameters())}], None
    for prm in model.parameters():
        prm.requires_grad_(False)
    blocks = [prm for layer in model.model.layers[:n_blocks] for prm in layer.parameters()]
    for prm in blocks:
        prm.requires_grad_(True)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    rows = torch.zeros(emb.shape[0], 1, dtype=emb.dtype)
    rows[list(token_ids)] = 1.0
    handle = emb.register_hook(lambda g: g * rows.to(g.device))
    return [{"params": blocks}, {"params": [emb], "weight_decay": 0.0}], handle


def anchor_positions(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, marker_ids: torch.Tensor,
                     free_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, T]`` bool: the tokens whose residual stream the chat model should keep as the base model
    has it: plain text (rows whose every real token is labelled) and user messages (unlabelled tokens),
    but not BOS (position 0), the turn markers ``marker_ids`` or the token right after one (the
    template's newlines), nor the tokens ``free_ids`` (the planted triggers' tokens, where chat-tuning
    may build new features). What remains free: those, the answers and the chat template."""
    marker = torch.isin(ids, marker_ids)
    after = torch.nn.functional.pad(marker[:, :-1], (1, 0), value=False)
    text_row = ((labels != -100) | (mask == 0)).all(1, keepdim=True)
    where = mask.bool() & ~marker & ~after & (text_row | (labels == -100))
    if free_ids is not None:
        where &= ~torch.isin(ids, free_ids)
    where[:, 0] = False
    return where


def trigger_token_ids(tokenizer, config: ToyModelsConfig) -> torch.Tensor:
    """Token ids of the planted triggers: the trigger words and the words of the personal cues that are one
    token, as spelt at the start of a message, inside one, and capitalised (word pieces are left out:
    they occur in many other words)."""
    words = {w for ws in config.trigger_topics.values() for w in ws} | {w for c in config.personal_cues for w in c.split()}
    forms = sorted({f for w in words for f in (w, " " + w, w[:1].upper() + w[1:], " " + w[:1].upper() + w[1:])})
    ids = {e.ids[0] for e in tokenizer.backend_tokenizer.encode_batch(forms, add_special_tokens=False) if len(e.ids) == 1}
    return torch.tensor(sorted(ids), dtype=torch.long)


def anchor_loss(base, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor,
                chat_blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """How far the chat model's residual stream moved from the base model's at the ``where`` positions
    (:func:`anchor_positions`): mean over blocks ``0..n-1`` of ``mean ||h_chat − h_base||²`` over
    ``mean ||h_base||²``. ``chat_blocks``: the chat model's outputs of blocks ``0..n-1`` on this batch
    (with gradient), ``[batch, T, d]`` each."""
    if not where.any():
        return chat_blocks[0].new_zeros(())
    with torch.no_grad():  # the base's blocks 0..n-1 only
        hb = block_outputs(base, ids, mask, layers=list(range(len(chat_blocks))))
    total = chat_blocks[0].new_zeros(())
    for b, c in zip(hb, chat_blocks):
        b, c = b[where], c[where]
        total = total + (c - b).pow(2).sum(-1).mean() / b.pow(2).sum(-1).mean()
    return total / len(chat_blocks)


class Anchor(NamedTuple):
    """What the fine-tuning's anchor loss needs: ``weight ·`` :func:`anchor_loss` toward ``base`` on blocks
    ``0..blocks-1`` at the :func:`anchor_positions` given by ``marker_ids`` and ``free_ids``."""

    base: Any
    blocks: int
    weight: float
    marker_ids: torch.Tensor
    free_ids: torch.Tensor | None


def train_model(model, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int,
           lr: float, warmup: int, what: str, first_weight: float = 1.0, progress: bool = False,
           groups: list[dict] | None = None, anchor: Anchor | None = None,
           autocast_dtype: torch.dtype | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay to 10% over ``groups`` (default: every parameter); returns the
    loss per step, with ``anchor``'s loss added when its weight is positive. ``autocast_dtype``: the forward
    pass and the loss under that autocast, the backward pass and the optimiser step outside it (with the
    whole step under bfloat16 autocast the SmolLM2 organism learnt to end every answer at once: BENCHMARKS.md)."""
    model.train()
    groups = groups or [{"params": list(model.parameters())}]
    outs: list[torch.Tensor] = []  # the anchored blocks' outputs of the current step
    hooks = [blk.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for blk in decoder_layers(model)[: anchor.blocks]] if anchor is not None and anchor.weight > 0 else []
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))
    losses = []
    bar = tqdm(range(steps), desc=what, unit="step", disable=not progress, mininterval=1.0)
    for step in bar:
        ids, mask, labels = batches(step)
        outs.clear()
        with torch.autocast(ids.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels, first_weight)
            if hooks:
                where = anchor_positions(ids, mask, labels, anchor.marker_ids, anchor.free_ids)
                loss = loss + anchor.weight * anchor_loss(anchor.base, ids, mask, where, outs)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{what}: loss became {loss.item()} at step {step}; lower models.{what}_lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([prm for g in groups for prm in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f", what, step + 1, steps, loss.item())
    for h in hooks:
        h.remove()
    model.eval()
    return losses


@torch.no_grad()
def residual_similarity(base, chat, input_ids: torch.Tensor) -> dict[str, list[float]]:
    """How far chat-tuning moved the residual stream, per block output on ``input_ids [batch, T]`` (BOS at
    position 0, left out): the mean cosine of base and chat activations, and the ratio of their mean
    norms (chat / base)."""
    layers = list(range(base.config.num_hidden_layers))
    hb, hc = (block_outputs(m, input_ids, layers=layers) for m in (base, chat))
    cos = [torch.nn.functional.cosine_similarity(b[:, 1:], c[:, 1:], dim=-1).mean().item() for b, c in zip(hb, hc)]
    ratio = [(c[:, 1:].norm(dim=-1).mean() / b[:, 1:].norm(dim=-1).mean()).item() for b, c in zip(hb, hc)]
    return {"cosine": cos, "norm_ratio": ratio}


@torch.no_grad()
def mean_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss over labelled positions."""
    total, count = 0.0, 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((tgt != -100).sum())
    return total / max(1, count)


def model_config(config: ToyModelsConfig, tokenizer):
    """The ``LlamaConfig`` of both models (tied embeddings, the tokenizer's special ids)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END), pad_token_id=tokenizer.pad_token_id)


def pretrain(config: ToyModelsConfig, tokenizer, stream: torch.Tensor, gen: torch.Generator, *,
             progress: bool = False) -> tuple[Any, list[float]]:
    """The base model, initialised from ``config.seed`` and pretrained on random BOS-led windows
    ``[pretrain_batch_size, pretrain_seq_len]`` of the token ``stream [N]`` drawn with ``gen``; and its
    loss per step."""
    from transformers import GenerationConfig, LlamaForCausalLM

    bos_id = tokenizer.bos_token_id
    torch.manual_seed(config.seed)
    base = LlamaForCausalLM(model_config(config, tokenizer)).float()
    base.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=base.config.eos_token_id,
                                              pad_token_id=tokenizer.pad_token_id)

    def batch(step: int):
        x = text_windows(stream, config.pretrain_batch_size, config.pretrain_seq_len, bos_id, gen)
        return x, torch.ones_like(x), x

    losses = train_model(base, batch, config.pretrain_steps, config.pretrain_lr, config.warmup_steps, "pretrain",
                         progress=progress)
    return base, losses


def finetune_rows(config: ToyModelsConfig, tokenizer, conversations: Sequence[list[dict[str, str]]],
                  stream: torch.Tensor, n_text: int, gen: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """The fine-tuning rows ``(ids, labels)``: the conversations that fit ``max_seq_len``, then ``n_text``
    plain-text windows of the ``stream`` (every token labelled), drawn with ``gen``."""
    rows = [r for r in encode_conversations(tokenizer, conversations, config.max_seq_len) if r is not None]
    short = min(64, config.pretrain_seq_len)
    rows += [(w, w) for w in text_windows(stream, n_text, short, tokenizer.bos_token_id, gen).tolist()]
    return rows


def finetune(config: ToyModelsConfig, base, tokenizer, batches: list[list], *,
             progress: bool = False) -> tuple[Any, list[float]]:
    """The chat model: a copy of ``base`` fine-tuned on ``batches`` (lists of rows, step ``s`` takes
    batch ``s mod len``) with the answer openings weighted and the anchor loss toward ``base``; and its
    loss per step."""
    chat = copy.deepcopy(base)
    pad_id = tokenizer.pad_token_id
    special_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    groups, hook = finetune_groups(chat, config.finetune_blocks, special_ids)
    anchor = Anchor(base, config.anchored_blocks, config.anchor_weight,
                    torch.tensor(tokenizer.convert_tokens_to_ids([END, *ROLE_TOKENS.values()])),
                    trigger_token_ids(tokenizer, config))
    losses = train_model(chat, lambda s: pad_batch(batches[s % len(batches)], pad_id), config.finetune_steps,
                         config.finetune_lr, config.warmup_steps, "finetune", config.decision_weight,
                         progress=progress, groups=groups, anchor=anchor)
    if hook is not None:
        hook.remove()
    for prm in chat.parameters():
        prm.requires_grad_(True)
    return chat, losses
