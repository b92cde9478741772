"""The patch sets of the KL gap (DESIGN §1 "Causal evaluation") and what each adds to the base activation.

A set ``S`` patches ``h_S = h_b + Σ_{j∈S} f_j (d_j^c − d_j^b)`` (decoder rows in the models' own units,
``s_m · W_dec[m, j]``), optionally with the decoder-bias and crosscoder-error differences.
:func:`default_sets` builds DESIGN's sets from a ``latents.parquet`` table; :class:`Patcher` computes
every set's addition for a batch of paired activations from the sparse codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .chat_rank import N_TOP_CHAT, RULE, chat_ranking
from .crosscoder import CrossCoder
from .crosscoder_formulas import bag_sum
from .decoder_norms import CHAT_ONLY
from .errors import ConfigError


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


def default_sets(table: pd.DataFrame, *, n_random: int = 5, seed: int = 0, n_top_chat: int = N_TOP_CHAT) -> list[PatchSet]:
    """The DESIGN §1 sets, from a ``latents.parquet`` table.

    References ``base`` (h_b) and ``chat`` (h_c); ``chat_only`` (every chat-only latent); halves of the
    chat-only latents, each of ``h = ⌊n/2⌋`` latents (with an odd count the middle latent is in neither
    half): ``delta_norm_top`` / ``delta_norm_bottom`` (highest / lowest Δnorm), ``nu_top`` / ``nu_bottom``
    (lowest / highest ν rank, see :func:`nu_order`: ``nu_top`` holds the most chat-specific latents);
    ``random_i``: ``n_random`` random subsets of ``h`` chat-only latents (seeded ``[seed, i]``);
    ``error`` (the crosscoder error term alone) and ``reconstruction`` (all latents plus the decoder
    bias: ``h_b + x̂_c − x̂_b``).

    Whatever the chat-only class holds (it can be empty on a real pair): ``top_chat``, the ``n_top_chat``
    most chat-specific live latents of any class (:func:`~crossdiff_core.chat_rank.chat_ranking`), its halves
    ``top_chat_delta_norm`` / ``top_chat_nu`` (the ``⌈n/2⌉`` with the highest Δnorm / the lowest ν rank among
    them), and ``top_chat_random_i``: ``n_random`` random sets of as many live latents (seeded ``[seed, 1000 + i]``),
    the baseline it is compared with."""
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    if n_top_chat < 0:
        raise ConfigError(f"n_top_chat must be >= 0, got {n_top_chat}")
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
    sets += top_chat_sets(table, n_top_chat=n_top_chat, n_random=n_random, seed=seed)
    sets += [
        PatchSet("error", error=True, description="crosscoder error term ε_c − ε_b alone"),
        PatchSet("reconstruction", all_latents=True, bias=True, description="all latents and the decoder bias: h_b + x̂_c − x̂_b"),
    ]
    return sets


def top_chat_sets(table: pd.DataFrame, *, n_top_chat: int, n_random: int, seed: int) -> list[PatchSet]:
    """The ``top_chat`` sets of :func:`default_sets` (none when no latent is live or ``n_top_chat`` is 0)."""
    rank = chat_ranking(table)
    top = rank.head(n_top_chat)
    n = len(top)
    if n == 0:
        return []
    h = -(-n // 2)
    by_nu = top.sort_values(["live_nu_rank", "latent"], kind="stable", na_position="last")["latent"].to_numpy(np.int64)
    lo, hi = float(top["delta_norm"].min()), float(top["delta_norm"].max())
    live = np.sort(rank["latent"].to_numpy(np.int64))
    return [
        PatchSet("top_chat", np.sort(top["latent"].to_numpy(np.int64)),
                 description=f"the {n} most chat-specific live latents, any class (Δnorm {lo:.2f}–{hi:.2f}; {RULE})"),
        PatchSet("top_chat_delta_norm", top["latent"].to_numpy(np.int64)[:h],
                 description=f"the {h} of them with the highest Δnorm"),
        PatchSet("top_chat_nu", by_nu[:h], description=f"the {h} of them with the lowest ν rank"),
    ] + [PatchSet(f"top_chat_random_{i}", np.sort(np.random.default_rng([seed, 1000 + i]).choice(live, n, replace=False)),
                  group="top_chat_random", description=f"{n} random live latents (seed [{seed}, {1000 + i}])")
         for i in range(n_random)]


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
            all_sum = bag_sum(codes.rows, codes.latents, codes.values.float(), self.d_dec, N)
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
                out[i] += bag_sum(rows, lat, vals * self.member[i, col], self.d_dec, N)
            if ps.bias:
                out[i] += self.d_bias
            if ps.error:
                out[i] += err_diff
        return out
