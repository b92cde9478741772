"""Chat-specificity ranking of every live latent (issue 12 "something to say even when nothing crosses 0.9").

The chat-only class (Δnorm > 0.9) can be empty on a real pair while latents just under the cut carry the
change. So the stages that show evidence (KL patch sets, cards, steering, the verdict) also take the top N
latents of one ranking over all live latents, whatever their class:

1. Δnorm descending, in steps of :data:`DN_STEP` (differences below it are noise, so ν decides among them);
2. then the ν rank ascending: ``rank(ν_ε) + rank(ν_r)`` over the live latents (one ranking across classes,
   unlike ``latents.parquet``'s ``nu_rank``, which ranks within each class), lower = more chat-specific;
   a latent with a NaN ν sorts after the finite ones of its Δnorm step;
3. then the latent index.

Dead latents (class ``dead``, or ``freq == 0`` in tables written before that class existed) are never ranked.
Computed from ``latents.parquet``'s columns, so the file's column list (an interface) is unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .decoder_norms import DEAD
from .latent_scaling import nu_rank

DN_STEP = 0.01
N_TOP_CHAT = 32  # the default N of every stage that carries the top N (KL sets, cards)
RULE = ("all live latents by Δnorm descending (in steps of 0.01), then rank(ν_ε) + rank(ν_r) over the live latents "
        "ascending (NaN last), then latent index")


def live_mask(table: pd.DataFrame) -> np.ndarray:
    """``[F]`` bool: the latents that fired (not class dead)."""
    live = (table["class"] != DEAD).to_numpy()
    if "freq" in table:
        live = live & ~(table["freq"].fillna(0).to_numpy() <= 0)  # not in place: pandas 3 hands out read-only arrays
    return live


def chat_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """The live latents of a ``latents.parquet`` table, most chat-specific first, with columns ``latent``,
    ``delta_norm``, ``nu_error``, ``nu_recon``, ``class`` and ``chat_rank`` (1 = most chat-specific) and
    ``live_nu_rank`` (the rank of step 2)."""
    t = table.loc[live_mask(table)].copy()
    for c in ("nu_error", "nu_recon"):  # a hand-built table without ν: Δnorm alone decides
        if c not in t:
            t[c] = np.nan
    t = t[["latent", "delta_norm", "nu_error", "nu_recon", "class"]]
    if t.empty:
        return t.assign(live_nu_rank=pd.Series(dtype="float64"), chat_rank=pd.Series(dtype="int64"))
    r = nu_rank(*(torch.from_numpy(np.array(t[c], dtype=np.float64)) for c in ("nu_error", "nu_recon")))
    t["live_nu_rank"] = r.numpy()
    step = np.floor(t["delta_norm"].to_numpy(np.float64) / DN_STEP + 1e-9)
    # lexsort: last key is primary
    order = np.lexsort((t["latent"].to_numpy(), np.nan_to_num(t["live_nu_rank"].to_numpy(), nan=np.inf), -step))
    t = t.iloc[order].reset_index(drop=True)
    t["chat_rank"] = np.arange(1, len(t) + 1, dtype=np.int64)
    return t


def top_chat(table: pd.DataFrame, n: int) -> np.ndarray:
    """``[≤ n]`` int64 latent indices: the ``n`` most chat-specific live latents (:func:`chat_ranking`)."""
    return chat_ranking(table)["latent"].to_numpy(np.int64)[: max(0, int(n))]
