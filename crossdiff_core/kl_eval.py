"""Causal evaluation of a crosscoder's latents: the KL gap (DESIGN §1 "Causal evaluation").

On chat conversations both models run to block ``L``; the chat model's block-``L`` output is replaced by

    h_S = h_b + Σ_{j∈S} f_j (d_j^c − d_j^b)        (decoder rows in the models' own units, s_m · W_dec[m, j])

and the chat model runs its remaining blocks. ``KL(p_chat || p_S)`` of the next-token distributions is
averaged per token over three groups of positions (a position is the token whose activation was
patched; its distribution predicts the token after it):

- ``first9``: the first 9 tokens of each assistant response (``is_assistant`` runs, end-of-turn marker
  included, see :mod:`crossdiff_core.data`),
- ``response``: every assistant-response token,
- ``template``: every chat-template token but BOS.

``h_b`` alone is 0% of the gap, ``h_c`` 100%; a set closes ``1 − KL_S / KL_base`` of it. BOS (position 0,
never cached, never seen by the crosscoder) keeps the chat activation in every patch, so every patch
differs from the chat model only where the crosscoder is defined.

Cost per batch of conversations: the first ``L + 1`` blocks of each model run once, and only the later
blocks run once per patched set, all sets of a pass stacked on the batch dimension. The later blocks
run through the model's own ``forward`` (its masks, rotary embeddings, final norm, soft-capping) with the
blocks up to ``L`` swapped for stand-ins that skip them and hand over the patched activation
(:mod:`crossdiff_core.patching`). The sets and what each adds: :mod:`crossdiff_core.patch_sets`.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .chat_rank import N_TOP_CHAT
from .config import from_dict, neutral
from .crosscoder import CrossCoder
from .data import DataConfig, build_corpus
from .errors import ConfigError, CrossdiffError, ModelMismatchError
from .models import ModelPair, decoder_layers, resolve_device
from .patch_sets import Patcher, PatchSet, default_sets
from .patching import kl_to, suffix_logits
from .runs import CROSSCODER_SHA, pair_for, read_latents

CATEGORIES = ("first9", "response", "template")
FIRST_N = 9


# ---- token groups ----------------------------------------------------------------------------------

def first_n_mask(is_assistant: torch.Tensor, n: int = FIRST_N) -> torch.Tensor:
    """``[B, T]`` bool: the first ``n`` tokens of every run of consecutive ``is_assistant`` tokens."""
    B, T = is_assistant.shape
    prev = torch.zeros_like(is_assistant)
    prev[:, 1:] = is_assistant[:, :-1]
    start = is_assistant & ~prev
    pos = torch.arange(T, device=is_assistant.device).expand(B, T)
    last_start = torch.where(start, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    return is_assistant & (pos - last_start < n)


@dataclass
class Batch:
    """Right-padded conversations: ``input_ids, attention_mask [B, T]`` and bool masks ``[B, T]``:
    ``patch`` (cached positions: real tokens but BOS) and one per :data:`CATEGORIES` (``groups [3, B, T]``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    patch: torch.Tensor
    groups: torch.Tensor

    @property
    def evaluated(self) -> torch.Tensor:
        return self.groups.any(0)


def make_batch(sequences: Sequence[Any], pad_id: int, *, first_n: int = FIRST_N, device=None) -> Batch:
    """``sequences``: :class:`~crossdiff_core.data.TokenSequence` (``token_ids``, ``is_template``,
    ``is_assistant``, ``cached``)."""
    T = max(len(s.token_ids) for s in sequences)
    B = len(sequences)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    m = np.zeros((4, B, T), dtype=bool)  # attention, cached, template, assistant
    for i, s in enumerate(sequences):
        n = len(s.token_ids)
        ids[i, :n] = s.token_ids
        m[0, i, :n], m[1, i, :n], m[2, i, :n], m[3, i, :n] = True, s.cached, s.is_template, s.is_assistant
    t = torch.from_numpy(m).to(device)
    patch = t[0] & t[1]
    asst = t[3] & patch
    groups = torch.stack([first_n_mask(asst, first_n), asst, t[2] & patch])
    return Batch(torch.from_numpy(ids).to(device), t[0].long(), patch, groups)


# ---- the evaluation --------------------------------------------------------------------------------

@dataclass
class KLConfig:
    """Settings of :func:`kl_gap`."""

    batch_size: int = neutral(8)  # conversations per batch (both models' first blocks run once per batch)
    max_logit_elements: int = neutral(1 << 27)  # bound on kept positions x vocab of the logits of one pass (memory)
    # bound on the token slots (sets x batch x length) of one pass of the later blocks; None: 2048 on CPU,
    # where larger passes fall out of cache and run slower per token (measured), 131072 on GPUs
    max_pass_tokens: int | None = neutral(None)
    progress: bool = neutral(True)  # progress bar

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.max_logit_elements <= 0 or (self.max_pass_tokens or 1) <= 0:
            raise ConfigError(f"batch_size, max_logit_elements and max_pass_tokens must be positive: {self}")


@dataclass
class EvaluateConfig(KLConfig):
    """The KL evaluation of a crosscoder (params.yaml ``evaluate``, ``crossdiff evaluate``): the held-out
    conversations, the random sets, the models' dtype, and :class:`KLConfig`'s batching."""

    chats: list = field(default_factory=list)  # held-out chat data (a messages column): files or datasets names
    messages_column: str = "messages"  # the chats' {role, content} list column
    split: str = "train"  # dataset split for datasets names
    tokens: int = 20_000  # conversation tokens to evaluate on
    max_length: int = 1024  # tokens per conversation, BOS included
    n_random: int = 5  # random sets of chat-only latents (the spread), and of live latents for top_chat
    n_top_chat: int = N_TOP_CHAT  # the top_chat sets: this many most chat-specific live latents, any class
    seed: int = 0  # conversation order and the random sets
    dtype: str = "float32"  # the models' dtype: float32 or bfloat16
    device: str = neutral("cpu")  # torch device: cpu, cuda or auto
    allow_mismatch: bool = neutral(False)  # deliberate cross-use: models or latents.parquet not the crosscoder's own

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "evaluate") -> "EvaluateConfig":
        """From params.yaml's ``evaluate`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)

    def data(self) -> DataConfig:
        """The conversations to evaluate on."""
        return DataConfig(chats=list(self.chats), n_tokens=self.tokens, max_length=self.max_length, seed=self.seed,
                          split=self.split, messages_column=self.messages_column)

    def kl(self) -> KLConfig:
        """The :func:`kl_gap` settings alone (what its result records)."""
        return KLConfig(**{f.name: getattr(self, f.name) for f in fields(KLConfig)})


@dataclass
class KLResult:
    """Per set and token group: mean ``KL(p_chat || p_S)`` and the fraction of the gap closed.
    ``kl [S, 3]`` float64 (NaN where a group has no tokens), ``n_tokens [3]``."""

    sets: list[PatchSet]
    kl: np.ndarray
    n_tokens: np.ndarray
    n_sequences: int
    timings: dict[str, float]
    config: KLConfig

    def gap_closed(self) -> np.ndarray:
        """``1 − KL_S / KL_base`` ``[S, 3]`` (NaN where ``KL_base`` is 0 or NaN)."""
        names = [s.name for s in self.sets]
        if "base" not in names:
            raise CrossdiffError("the evaluation has no 'base' set: include PatchSet('base') to get the gap")
        base = self.kl[names.index("base")]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(base > 0, 1.0 - self.kl / base, np.nan)

    def to_dict(self) -> dict:
        """JSON-friendly summary (NaN as None); random sets summarised by group (mean, std, min, max)."""
        def num(v: float) -> float | None:
            return None if not math.isfinite(float(v)) else float(v)

        gap = self.gap_closed()
        rows = []
        for k, s in enumerate(self.sets):
            rows.append({"name": s.name, "group": s.group, "size": s.size, "description": s.description,
                         "kl": {c: num(self.kl[k, i]) for i, c in enumerate(CATEGORIES)},
                         "gap_closed": {c: num(gap[k, i]) for i, c in enumerate(CATEGORIES)}})
        groups = {}
        for g in sorted({s.group for s in self.sets if s.group}):
            idx = [k for k, s in enumerate(self.sets) if s.group == g]
            stats = {}
            for what, arr in (("kl", self.kl[idx]), ("gap_closed", gap[idx])):
                for stat, fn in (("mean", np.nanmean), ("std", np.nanstd), ("min", np.nanmin), ("max", np.nanmax)):
                    with _quiet():  # all-NaN columns (a token group with no tokens)
                        v = fn(arr, axis=0)
                    stats[f"{what}_{stat}"] = {c: num(v[i]) for i, c in enumerate(CATEGORIES)}
            groups[g] = {"n_sets": len(idx), "size": self.sets[idx[0]].size, **stats}
        return {"categories": {"first9": f"the first {FIRST_N} tokens of each assistant response",
                               "response": "every assistant-response token (end-of-turn marker included)",
                               "template": "every chat-template token but BOS"},
                "category_keys": list(CATEGORIES),
                "n_tokens": {c: int(self.n_tokens[i]) for i, c in enumerate(CATEGORIES)},
                "n_sequences": self.n_sequences, "sets": rows, "groups": groups,
                "timings": self.timings, "config": asdict(self.config)}


@contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _batches(sequences: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """Batches of similar length (little padding); the sums do not depend on the order."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].token_ids))
    return [[sequences[i] for i in order[a:a + batch_size]] for a in range(0, len(order), batch_size)]


@torch.inference_mode()
def kl_gap(pair: ModelPair, cc: CrossCoder | None, sequences: Sequence[Any], sets: Sequence[PatchSet],
           cfg: KLConfig | None = None, *, patcher: Callable[[list[PatchSet]], Any] | None = None) -> KLResult:
    """Mean ``KL(p_chat || p_S)`` per set and token group over ``sequences`` (chat
    :class:`~crossdiff_core.data.TokenSequence`, formatted by the chat model's template).

    ``sets`` must include ``PatchSet("chat", chat=True)`` (it gives ``p_chat``); add ``PatchSet("base")``
    for the gap. Per batch: each model's first ``L + 1`` blocks once, then the later blocks of the chat
    model for every set, stacked on the batch dimension as far as ``cfg.max_logit_elements`` and
    ``cfg.max_pass_tokens`` allow. ``patcher``: builds, from the sets in evaluation order, what computes each
    set's addition to ``h_b`` (``.deltas(x [N, 2, d]) -> [S, N, d]``); default the crosscoder's
    :class:`~crossdiff_core.patch_sets.Patcher` (then ``cc`` may be None: the scoreboard's subspace patches)."""
    cfg = cfg or KLConfig()
    sets = list(sets)
    if cc is None and patcher is None:
        raise ConfigError("kl_gap needs a crosscoder or a patcher: what the sets add to the base activation")
    if not sequences:
        raise ConfigError("no conversations to evaluate on: pass held-out chat data (a `messages` column)")
    chat_idx = [k for k, s in enumerate(sets) if s.chat]
    if not chat_idx:
        raise ConfigError("the patch sets need the chat reference PatchSet('chat', chat=True): it gives p_chat")
    if cc is not None and cc.cfg.d_model != pair.d_model:
        raise ModelMismatchError(f"the crosscoder has d_model={cc.cfg.d_model} but the models have "
                                 f"{pair.d_model}: use a crosscoder trained on these models' layer {pair.layer}")
    # the chat reference runs first: every other set's KL needs p_chat
    order = chat_idx[:1] + [k for k in range(len(sets)) if k != chat_idx[0]]
    if patcher is None:
        cc = cc.eval()
        patcher = lambda ordered: Patcher(cc, ordered)  # noqa: E731
    patcher = patcher([sets[k] for k in order])
    device, dtype, layer = pair.device, pair.dtype, pair.layer
    pad_id = pair.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = pair.tokenizer.eos_token_id or 0
    vocab = int(pair.chat.get_output_embeddings().weight.shape[0])
    S = len(sets)
    kl_sum = torch.zeros(S, len(CATEGORIES), dtype=torch.float64, device=device)
    n_tok = torch.zeros(len(CATEGORIES), dtype=torch.int64, device=device)
    t = {"prefix": 0.0, "patch": 0.0, "suffix": 0.0}
    t_start = time.perf_counter()
    batches = _batches(sequences, cfg.batch_size)
    for seqs in tqdm(batches, disable=not cfg.progress, desc="kl-eval", unit="batch"):
        t0 = time.perf_counter()
        b = make_batch(seqs, pad_id, device=device)
        seen: list[bool] = []  # the block's output type, for the stand-ins (runs before the stop hook)
        handle = decoder_layers(pair.chat)[layer].register_forward_hook(
            lambda _m, _a, out: seen.append(isinstance(out, tuple)))
        try:
            h_b, h_c = pair.residuals(b.input_ids, b.attention_mask)  # [B, T, d] each
        finally:
            handle.remove()
        tuple_out = seen[0]
        t1 = time.perf_counter()
        pm = b.patch
        x = torch.stack([h_b[pm], h_c[pm]], dim=1)  # [N, 2, d]
        if not bool(torch.isfinite(x).all()):
            which = [m for i, m in enumerate(("base", "chat")) if not bool(torch.isfinite(x[:, i]).all())]
            raise CrossdiffError(f"the {' and '.join(which)} model's block-{layer} activations hold NaN or inf on "
                                 "these conversations: the KL gap cannot be measured; load the models in float32 "
                                 "(--dtype float32) or check their weights")
        deltas = patcher.deltas(x).to(device)  # [S, N, d] float32 in `order`
        base_tok = h_b[pm].float()
        keep = b.evaluated  # [B, T]
        gmask = b.groups[:, keep].to(torch.float64)  # [3, n_keep]
        n_keep = int(keep.sum())
        n_tok += b.groups[:, keep].sum(1)
        t2 = time.perf_counter()
        t["prefix"] += t1 - t0
        t["patch"] += t2 - t1
        if n_keep == 0:
            continue
        slots = cfg.max_pass_tokens or (2048 if device.type == "cpu" else 131072)
        per_pass = max(1, min(cfg.max_logit_elements // max(1, n_keep * vocab), slots // b.input_ids.numel()))
        logp_chat = None
        for a in range(0, S, per_pass):
            chunk = order[a:a + per_pass]
            g = len(chunk)
            H = h_c.unsqueeze(0).repeat(g, 1, 1, 1)  # [g, B, T, d]
            for i, k in enumerate(chunk):
                if not sets[k].chat:
                    H[i][pm] = (base_tok + deltas[a + i]).to(dtype)
            logits = suffix_logits(pair.chat, layer, b.input_ids.repeat(g, 1), b.attention_mask.repeat(g, 1),
                                   H.view(g * H.shape[1], *H.shape[2:]), keep.repeat(g, 1), tuple_out=tuple_out)
            logits = logits.view(g, n_keep, -1)
            if logp_chat is None:
                logp_chat = torch.log_softmax(logits[0].float(), dim=-1)  # order[0] is the chat reference
                p_chat = logp_chat.exp()
            kl_sum[chunk] += kl_to(logits, logp_chat, p_chat).double() @ gmask.T
        t["suffix"] += time.perf_counter() - t2
    t["total"] = time.perf_counter() - t_start
    n = n_tok.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = np.where(n > 0, kl_sum.cpu().numpy() / np.maximum(n, 1), np.nan)
    return KLResult(sets, kl, n, len(sequences), t, cfg)


def evaluate_crosscoder(crosscoder: str | os.PathLike, latents: str | os.PathLike, cfg: EvaluateConfig, *,
                        base: str | None = None, chat: str | None = None, layer: int | None = None) -> dict:
    """The KL gap of :func:`default_sets` for a crosscoder directory and its ``latents.parquet``, on the
    chat conversations ``cfg.chats``. Models and layer default to those of the crosscoder's training
    cache. Returns :meth:`KLResult.to_dict` plus ``inputs``."""
    data, dtype = cfg.data(), cfg.dtype
    dev = str(resolve_device(cfg.device))
    cc = CrossCoder.load(crosscoder, device=dev)
    table = read_latents(latents, cc, allow_mismatch=cfg.allow_mismatch)
    pair = pair_for(cc, base=base, chat=chat, layer=layer, dtype=dtype, device=dev, allow_mismatch=cfg.allow_mismatch)
    seqs = build_corpus(pair.tokenizer, data).sequences
    d = kl_gap(pair, cc, seqs, default_sets(table, n_random=cfg.n_random, seed=cfg.seed, n_top_chat=cfg.n_top_chat), cfg.kl()).to_dict()
    d["inputs"] = {"crosscoder": str(crosscoder), CROSSCODER_SHA: cc.weights_sha256, "latents": str(latents),
                   "layer": pair.layer, "models": {"base": pair.base_name, "chat": pair.chat_name},
                   "fingerprints": pair.fingerprints(), "models_check": pair.models_check, "data": data.to_dict(),
                   "dtype": dtype, "device": dev}
    return d
