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
blocks up to ``L`` swapped for stand-ins that skip them and hand over the patched activation.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import from_dict, neutral
from .crosscoder import CrossCoder
from .data import DataConfig, build_corpus
from .decoder_norms import CHAT_ONLY
from .errors import ConfigError, CrossdiffError, ModelMismatchError
from .models import ModelPair, decoder_layers, residual_stream, resolve_device
from .runs import pair_for, read_latents

CATEGORIES = ("first9", "response", "template")
FIRST_N = 9


# ---- patch sets ----------------------------------------------------------------------------------

@dataclass
class PatchSet:
    """One patch ``h = h_b + Σ_{j∈latents} f_j Δd_j [+ Δb_dec] [+ Δε]`` (Δ = chat minus base, model units).

    ``all_latents``: every latent (then ``latents`` is ignored); ``bias``: add ``s_c b_dec^c − s_b b_dec^b``;
    ``error``: add the crosscoder error difference ``ε_c − ε_b``; ``chat``: the chat activation itself
    (the 100% reference). ``group``: sets summarised together (the random sets)."""

    name: str
    latents: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    all_latents: bool = False
    bias: bool = False
    error: bool = False
    chat: bool = False
    group: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self.latents = np.array(self.latents, dtype=np.int64).reshape(-1)  # a writable copy

    @property
    def size(self) -> int | None:
        """Number of latents patched (None for every latent / the chat reference)."""
        return None if (self.all_latents or self.chat) else int(self.latents.size)


def nu_order(table: pd.DataFrame) -> np.ndarray:
    """Latent ids of ``table`` from most to least chat-specific by the ν rank (``rank(ν_ε) + rank(ν_r)``,
    ascending); NaN ranks (latents that never fired) last; ties by latent id."""
    t = table.assign(_nan=table["nu_rank"].isna()).sort_values(["_nan", "nu_rank", "latent"], kind="stable")
    return t["latent"].to_numpy(np.int64)


def delta_norm_order(table: pd.DataFrame) -> np.ndarray:
    """Latent ids of ``table`` by Δnorm, highest first; ties by latent id."""
    return table.sort_values(["delta_norm", "latent"], ascending=[False, True], kind="stable")["latent"].to_numpy(np.int64)


def default_sets(table: pd.DataFrame, *, n_random: int = 5, seed: int = 0) -> list[PatchSet]:
    """The DESIGN §1 sets, from a ``latents.parquet`` table.

    References ``base`` (h_b) and ``chat`` (h_c); ``chat_only`` (every chat-only latent); halves of the
    chat-only latents, each of ``h = ⌊n/2⌋`` latents (with an odd count the middle latent is in neither
    half): ``delta_norm_top`` / ``delta_norm_bottom`` (highest / lowest Δnorm), ``nu_top`` / ``nu_bottom``
    (lowest / highest ν rank, see :func:`nu_order`: ``nu_top`` holds the most chat-specific latents);
    ``random_i``: ``n_random`` random subsets of ``h`` chat-only latents (seeded ``[seed, i]``);
    ``error`` (the crosscoder error term alone) and ``reconstruction`` (all latents plus the decoder
    bias: ``h_b + x̂_c − x̂_b``)."""
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    co = table[table["class"] == CHAT_ONLY]
    ids = np.sort(co["latent"].to_numpy(np.int64))
    h = ids.size // 2
    by_dn, by_nu = delta_norm_order(co), nu_order(co)
    sets = [
        PatchSet("base", description="base activation h_b (0% of the gap)"),
        PatchSet("chat", chat=True, description="chat activation h_c (100% of the gap)"),
        PatchSet("chat_only", ids, description=f"all {ids.size} chat-only latents"),
    ]
    if h > 0:
        sets += [
            PatchSet("delta_norm_top", by_dn[:h], description=f"{h} chat-only latents with the highest Δnorm"),
            PatchSet("delta_norm_bottom", by_dn[-h:], description=f"{h} chat-only latents with the lowest Δnorm"),
            PatchSet("nu_top", by_nu[:h], description=f"{h} chat-only latents with the lowest ν rank (most chat-specific)"),
            PatchSet("nu_bottom", by_nu[-h:], description=f"{h} chat-only latents with the highest ν rank"),
        ]
        sets += [PatchSet(f"random_{i}", np.sort(np.random.default_rng([seed, i]).choice(ids, h, replace=False)),
                          group="random", description=f"{h} random chat-only latents (seed [{seed}, {i}])")
                 for i in range(n_random)]
    sets += [
        PatchSet("error", error=True, description="crosscoder error term ε_c − ε_b alone"),
        PatchSet("reconstruction", all_latents=True, bias=True, description="all latents and the decoder bias: h_b + x̂_c − x̂_b"),
    ]
    return sets


def _bag_sum(rows: torch.Tensor, latents: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """``out[r] = Σ weights[i] · table[latents[i]]`` over the entries ``i`` with ``rows[i] = r`` (rows sorted):
    ``[n, d]``, cost proportional to the number of entries."""
    counts = torch.bincount(rows, minlength=n)
    return torch.nn.functional.embedding_bag(latents, table, torch.cumsum(counts, 0) - counts, mode="sum",
                                             per_sample_weights=weights)


class Patcher:
    """Computes, for a batch of paired activations, what each :class:`PatchSet` adds to ``h_b``.

    Decoder rows and biases in the models' own units: ``Δd_j = s_c W_dec[1, j] − s_b W_dec[0, j]`` ``[F, d]``,
    ``Δb = s_c b_dec[1] − s_b b_dec[0]``.
    """

    def __init__(self, cc: CrossCoder, sets: Sequence[PatchSet]):
        F = cc.cfg.dict_size
        for s in sets:
            if s.latents.size and (s.latents.min() < 0 or s.latents.max() >= F):
                raise ConfigError(f"patch set {s.name!r} names latents outside 0..{F - 1}: the latents table "
                                  "does not belong to this crosscoder")
        self.cc, self.sets = cc, list(sets)
        s = cc.scales.float()
        W, b = cc.W_dec.detach().float(), cc.b_dec.detach().float()
        self.d_dec = s[1] * W[1] - s[0] * W[0]  # [F, d]
        self.d_bias = s[1] * b[1] - s[0] * b[0]  # [d]
        used = [s.latents for s in self.sets if not (s.all_latents or s.chat)]
        U = np.unique(np.concatenate(used)) if used else np.zeros(0, dtype=np.int64)
        dev = W.device
        self.U = torch.as_tensor(U, device=dev)
        self.lut = torch.full((F,), -1, dtype=torch.int64, device=dev)
        self.lut[self.U] = torch.arange(U.size, device=dev)
        self.member = torch.zeros(len(self.sets), U.size, dtype=torch.float32, device=dev)  # [S, |U|]
        for k, ps in enumerate(self.sets):
            if not (ps.all_latents or ps.chat) and ps.latents.size:
                self.member[k, self.lut[torch.as_tensor(ps.latents, device=dev)]] = 1.0
        self.need_recon = any(ps.all_latents or ps.error for ps in self.sets)

    @torch.no_grad()
    def deltas(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 2, d]`` (base, chat; model units) -> ``[S, N, d]`` float32, what set ``k`` adds to ``x[:, 0]``.

        Sums ``Σ_j f_j Δd_j`` run over the active codes only (``embedding_bag``, like the crosscoder's
        sparse decoder); the error difference is ``ε_c − ε_b = (x_c − x_b) − (x̂_c − x̂_b)`` with
        ``x̂_c − x̂_b = Σ_j f_j Δd_j + Δb``, so no full decode is needed."""
        x = x.to(device=self.d_dec.device, dtype=torch.float32)
        codes = self.cc.encode_sparse(x, batch_topk=False)  # inference codes (BatchTopK: the threshold)
        N = x.shape[0]
        out = torch.zeros(len(self.sets), N, x.shape[-1], dtype=torch.float32, device=x.device)
        if self.need_recon:
            all_sum = _bag_sum(codes.rows, codes.latents, codes.values.float(), self.d_dec, N)
            err_diff = (x[:, 1] - x[:, 0]) - all_sum - self.d_bias
        col = self.lut[codes.latents]
        sel = col >= 0  # codes of latents some set names
        rows, lat, vals, col = codes.rows[sel], codes.latents[sel], codes.values[sel].float(), col[sel]
        for i, ps in enumerate(self.sets):  # a handful of sets
            if ps.chat:  # the chat activation is used as it is
                continue
            if ps.all_latents:
                out[i] += all_sum
            elif ps.latents.size:
                out[i] += _bag_sum(rows, lat, vals * self.member[i, col], self.d_dec, N)
            if ps.bias:
                out[i] += self.d_bias
            if ps.error:
                out[i] += err_diff
        return out


# ---- running the later blocks from a given block-L output ------------------------------------------

class _StandIn(nn.Module):
    """Takes the place of a block up to ``L``: returns its input (skipping the block), or for block ``L``
    the given hidden states."""

    def __init__(self, block: nn.Module, tuple_out: bool, hidden: torch.Tensor | None = None):
        super().__init__()
        if hasattr(block, "attention_type"):  # some model loops pick the mask by the block's attribute
            self.attention_type = block.attention_type
        self._tuple, self._hidden = tuple_out, hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        h = hidden_states if self._hidden is None else self._hidden
        return (h,) if self._tuple else h


@contextmanager
def _blocks_replaced(model: nn.Module, layer: int, hidden: torch.Tensor, tuple_out: bool) -> Iterator[None]:
    blocks = decoder_layers(model)
    saved = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            blocks[i] = _StandIn(saved[i], tuple_out)
        blocks[layer] = _StandIn(saved[layer], tuple_out, hidden)
        yield
    finally:
        for i, blk in enumerate(saved):
            blocks[i] = blk


def block_returns_tuple(model: nn.Module) -> bool:
    """Whether the model's decoder blocks return a tuple (transformers 4.x) or a tensor (5.x)."""
    seen: list[bool] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        seen.append(isinstance(out, tuple))

    handle = decoder_layers(model)[0].register_forward_hook(hook)
    try:
        residual_stream(model, torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), layer=0)
    finally:
        handle.remove()
    return seen[0]


@torch.inference_mode()
def suffix_logits(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  hidden: torch.Tensor, keep: torch.Tensor | None = None, *, tuple_out: bool | None = None) -> torch.Tensor:
    """Logits of ``model`` when its block-``layer`` output is ``hidden [B, T, d]``: only blocks after
    ``layer``, the final norm and the head run. ``keep [B, T]`` bool: return ``[n_keep, V]`` logits of those
    positions only (row-major order); None: ``[B, T, V]``."""
    if tuple_out is None:
        tuple_out = block_returns_tuple(model)
    with _blocks_replaced(model, layer, hidden, tuple_out):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=keep if keep is not None else 0)
    logits = out.logits
    if keep is not None and logits.shape[0] != int(keep.sum()):
        raise CrossdiffError(f"{type(model).__name__} did not honour a boolean logits_to_keep mask "
                             "(needs transformers >= 5): upgrade transformers")
    return logits


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
    n_random: int = 5  # random sets of chat-only latents (the spread)
    seed: int = 0  # conversation order and the random sets
    dtype: str = "float32"  # the models' dtype: float32 or bfloat16
    device: str = neutral("cpu")  # torch device: cpu, cuda or auto

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


def _kl_to(logits: torch.Tensor, logp_ref: torch.Tensor, p_ref: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """``KL(p_ref || softmax(logits))`` per position: ``logits [g, n, V]``, ``logp_ref``/``p_ref [n, V]`` ->
    ``[g, n]`` float32. Blocks of ``rows`` positions keep the vocab-sized temporaries in cache (the log-softmax
    and the products run over the block while it is still there)."""
    g, n, _ = logits.shape
    out = torch.empty(g, n, dtype=torch.float32, device=logits.device)
    for r in range(0, n, rows):
        lp = torch.log_softmax(logits[:, r:r + rows].float(), dim=-1)
        # Σ_v p_ref (log p_ref − log p_S), in place on the block
        out[:, r:r + rows] = lp.neg_().add_(logp_ref[r:r + rows]).mul_(p_ref[r:r + rows]).sum(-1).clamp_min_(0.0)
    return out


@torch.inference_mode()
def kl_gap(pair: ModelPair, cc: CrossCoder, sequences: Sequence[Any], sets: Sequence[PatchSet],
           cfg: KLConfig | None = None) -> KLResult:
    """Mean ``KL(p_chat || p_S)`` per set and token group over ``sequences`` (chat
    :class:`~crossdiff_core.data.TokenSequence`, formatted by the chat model's template).

    ``sets`` must include ``PatchSet("chat", chat=True)`` (it gives ``p_chat``); add ``PatchSet("base")``
    for the gap. Per batch: each model's first ``L + 1`` blocks once, then the later blocks of the chat
    model for every set, stacked on the batch dimension as far as ``cfg.max_logit_elements`` and
    ``cfg.max_pass_tokens`` allow."""
    cfg = cfg or KLConfig()
    sets = list(sets)
    if not sequences:
        raise ConfigError("no conversations to evaluate on: pass held-out chat data (a `messages` column)")
    chat_idx = [k for k, s in enumerate(sets) if s.chat]
    if not chat_idx:
        raise ConfigError("the patch sets need the chat reference PatchSet('chat', chat=True): it gives p_chat")
    if cc.cfg.d_model != pair.d_model:
        raise ModelMismatchError(f"the crosscoder has d_model={cc.cfg.d_model} but the models have "
                                 f"{pair.d_model}: use a crosscoder trained on these models' layer {pair.layer}")
    # the chat reference runs first: every other set's KL needs p_chat
    order = chat_idx[:1] + [k for k in range(len(sets)) if k != chat_idx[0]]
    cc = cc.eval()
    patcher = Patcher(cc, [sets[k] for k in order])
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
            kl_sum[chunk] += _kl_to(logits, logp_chat, p_chat).double() @ gmask.T
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
    table = read_latents(latents, cc)
    pair = pair_for(cc, base=base, chat=chat, layer=layer, dtype=dtype, device=dev)
    seqs = build_corpus(pair.tokenizer, data).sequences
    d = kl_gap(pair, cc, seqs, default_sets(table, n_random=cfg.n_random, seed=cfg.seed), cfg.kl()).to_dict()
    d["inputs"] = {"crosscoder": str(crosscoder), "latents": str(latents), "layer": pair.layer,
                   "models": {"base": pair.base_name, "chat": pair.chat_name}, "data": data.to_dict(),
                   "dtype": dtype, "device": dev}
    return d
