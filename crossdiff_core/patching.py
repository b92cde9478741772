"""Running a model's later blocks from a given block-``L`` activation, and the KL of next-token distributions.

:func:`suffix_logits` runs the model's own ``forward`` (its masks, rotary embeddings, final norm,
soft-capping) with the blocks up to ``L`` swapped for stand-ins that skip them and hand over the given
activation, so only the blocks after ``L``, the final norm and the head cost anything. :func:`kl_to` is
``KL(p_ref || p)`` per position, computed in cache-sized blocks. Used by the KL gap
(:mod:`crossdiff_core.kl_eval`), the layer scan (:mod:`crossdiff_core.locate`) and the diff lens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .errors import CrossdiffError
from .models import decoder_layers, residual_stream


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



def kl_to(logits: torch.Tensor, logp_ref: torch.Tensor, p_ref: torch.Tensor, rows: int = 32) -> torch.Tensor:
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
