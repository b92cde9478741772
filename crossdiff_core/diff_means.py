"""The mean activation difference of a base/chat pair, per block and window slot (DESIGN: the
activation-difference lens, :mod:`crossdiff_core.diff_lens`).

For every block ``L`` and a window of ``n`` positions per sequence

    δ_{L,p} = mean over sequences of  h_chat,L[p] − h_base,L[p]        [n_layers, n, d]
    δ_L     = mean over every window token                              [n_layers, d]

summed in float64 by :class:`DiffMeans` (``update`` / ``merge`` / ``result``), with the mean norms
``‖h_base,L‖``, ``‖h_chat,L‖`` over the same tokens. :func:`window_positions` places the window
(``first``: after BOS; ``answer_start``: the last ``n`` tokens); :func:`mean_differences` runs both models
over token rows and fills the accumulator.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, CrossdiffError
from .generation import pad_token_id
from .models import ModelPair, block_outputs

WINDOWS = ("answer_start", "first")  # where a chat prompt's window sits


class DiffMeans:
    """Streaming float64 sums of both models' block outputs over window tokens: ``n_layers`` blocks,
    ``n_positions`` window slots, width ``d``. :meth:`update` once per batch, :meth:`merge` adds another
    accumulator's sums (one per shard or worker), :meth:`result` gives the means. The sums are additive, so
    batch size and order change the result only by float64 round-off."""

    def __init__(self, n_layers: int, n_positions: int, d: int, *, device: str | torch.device | None = None):
        f64 = dict(dtype=torch.float64, device=device)
        self.shape = (n_layers, n_positions, d)
        self.sum_base = torch.zeros(n_layers, n_positions, d, **f64)  # Σ h_base per block and slot
        self.sum_chat = torch.zeros(n_layers, n_positions, d, **f64)  # Σ h_chat
        self.sum_norm = torch.zeros(2, n_layers, n_positions, **f64)  # Σ ‖h_base‖, Σ ‖h_chat‖
        self.count = torch.zeros(n_positions, dtype=torch.int64, device=device)  # tokens per slot
        self.n_sequences = 0

    @torch.no_grad()
    def update(self, x_base: torch.Tensor, x_chat: torch.Tensor, slots: torch.Tensor, *, n_sequences: int = 0) -> None:
        """Add ``N`` window tokens: ``x_base``, ``x_chat`` ``[n_layers, N, d]`` (any float dtype), ``slots [N]``
        int64 (each token's window slot)."""
        L, P, d = self.shape
        if x_base.shape != x_chat.shape or x_base.ndim != 3 or x_base.shape[0] != L or x_base.shape[2] != d:
            raise ConfigError(f"x_base and x_chat must both be [{L}, N, {d}], got {list(x_base.shape)} and "
                              f"{list(x_chat.shape)}")
        slots = slots.to(device=self.count.device, dtype=torch.int64)
        if slots.shape != (x_base.shape[1],) or (slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < P):
            raise ConfigError(f"slots must be [N={x_base.shape[1]}] ints in 0..{P - 1}")
        xb = x_base.to(device=self.count.device, dtype=torch.float64)
        xc = x_chat.to(device=self.count.device, dtype=torch.float64)
        self.sum_base.index_add_(1, slots, xb)
        self.sum_chat.index_add_(1, slots, xc)
        self.sum_norm[0].index_add_(1, slots, xb.norm(dim=-1))
        self.sum_norm[1].index_add_(1, slots, xc.norm(dim=-1))
        self.count += torch.bincount(slots, minlength=P)
        self.n_sequences += int(n_sequences)

    def merge(self, other: DiffMeans) -> DiffMeans:
        """Add ``other``'s sums (same shape) into this one; returns self."""
        if other.shape != self.shape:
            raise ConfigError(f"cannot merge mean-difference sums of shape {other.shape} into {self.shape}")
        for name in ("sum_base", "sum_chat", "sum_norm", "count"):
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        self.n_sequences += other.n_sequences
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """float64 means: ``delta``, ``base_mean``, ``chat_mean`` ``[n_layers, d]`` and ``base_norm``,
        ``chat_norm`` ``[n_layers]`` (mean ``‖h‖``) over every window token; ``delta_per_position``
        ``[n_layers, n_positions, d]`` (NaN in a slot without tokens); ``count [n_positions]`` int64."""
        n = int(self.count.sum())
        if n == 0:
            raise CrossdiffError("no window tokens were seen: give sequences with at least one token after BOS")
        c = self.count.double()
        per_pos = (self.sum_chat - self.sum_base) / c.clamp_min(1)[None, :, None]
        per_pos[:, self.count == 0] = float("nan")
        base_mean, chat_mean = self.sum_base.sum(1) / n, self.sum_chat.sum(1) / n
        return {"delta": chat_mean - base_mean, "delta_per_position": per_pos, "base_mean": base_mean,
                "chat_mean": chat_mean, "base_norm": self.sum_norm[0].sum(1) / n,
                "chat_norm": self.sum_norm[1].sum(1) / n, "count": self.count.clone()}


def window_positions(lengths: torch.Tensor, starts: torch.Tensor, n_positions: int, window: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions ``[B, n]`` int64 of each row's window slots and which are real ``[B, n]`` bool.
    ``lengths [B]``: tokens per row; ``starts [B]``: the first position that may be in a window (1 after BOS).
    ``first``: positions ``start .. start + n − 1``; ``answer_start``: the last ``n`` positions (not before ``start``)."""
    if window not in WINDOWS:
        raise ConfigError(f"window must be one of {WINDOWS}, got {window!r}")
    ar = torch.arange(n_positions, device=lengths.device)[None, :]
    if window == "first":
        pos = starts[:, None] + ar
        return pos, pos < lengths[:, None]
    pos = lengths[:, None] - n_positions + ar
    return pos, pos >= starts[:, None]


@torch.no_grad()  # not inference_mode: the accumulator's sums stay ordinary tensors that merge() can add to
def mean_differences(pair: ModelPair, rows: Sequence[Sequence[int]], n_layers: int, *, n_positions: int,
                     window: str = "first", batch_size: int = 32, bar: tqdm | None = None) -> DiffMeans:
    """:class:`DiffMeans` of both models' block outputs (every block) on the window of each token row
    (see :func:`window_positions`; BOS at position 0 is never in a window). Rows are batched by length,
    right padded (padding never changes a real token's activations)."""
    acc = DiffMeans(n_layers, n_positions, pair.d_model, device=pair.device)
    bos, pad = pair.tokenizer.bos_token_id, pad_token_id(pair.tokenizer)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    keep = n_positions + 1 if window == "first" else None  # causal: the window never sees the tokens after it
    for a in range(0, len(order), batch_size):
        chunk = [list(rows[i][:keep]) for i in order[a:a + batch_size]]
        lengths = torch.tensor([len(r) for r in chunk])
        ids = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.as_tensor(r)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        starts = ((ids[:, 0] == bos) if bos is not None else torch.zeros(len(chunk), dtype=torch.bool)).long()
        pos, valid = window_positions(lengths, starts, n_positions, window)
        b, s = valid.nonzero(as_tuple=True)
        t = pos[b, s]
        ids, mask = ids.to(pair.device), mask.to(pair.device)
        b, t = b.to(pair.device), t.to(pair.device)
        hb = block_outputs(pair.base, ids, mask, layers=range(n_layers))
        hc = block_outputs(pair.chat, ids, mask, layers=range(n_layers))
        acc.update(torch.stack([h[b, t] for h in hb]), torch.stack([h[b, t] for h in hc]), s, n_sequences=len(chunk))
        if bar is not None:
            bar.update(len(chunk))
    return acc
