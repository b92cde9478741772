"""Decoder-norm statistics of DESIGN §1: Δnorm, the latent classes (plus dead: never fired), and the base/chat
decoder cosine."""

from __future__ import annotations

import torch

CHAT_ONLY, BASE_ONLY, SHARED, OTHER, DEAD = "chat_only", "base_only", "shared", "other", "dead"
# a latent that never fires has no evidence either way: its Δnorm is still its init's 0.5, so it is a class of its
# own rather than "shared" (last, so the Δnorm classes keep their codes)
CLASSES = (CHAT_ONLY, BASE_ONLY, SHARED, OTHER, DEAD)


def delta_norm(norm_base: torch.Tensor, norm_chat: torch.Tensor) -> torch.Tensor:
    """``Δnorm = ½((||d^c|| − ||d^b||) / max(||d^c||, ||d^b||) + 1)``: 1 = chat-only, 0 = base-only.

    ``[F]`` -> ``[F]``; a latent whose decoders are both zero gets 0.5 (no evidence either way).
    """
    m = torch.maximum(norm_base, norm_chat)
    ratio = torch.where(m > 0, (norm_chat - norm_base) / m.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))
    return 0.5 * (ratio + 1.0)


def classify(dn: torch.Tensor, fired: torch.Tensor | None = None) -> list[str]:
    """Class of each latent from ``Δnorm [F]``: chat-only > 0.9, base-only < 0.1, shared in [0.4, 0.6];
    dead where ``fired [F]`` (bool, when given) is False."""
    codes = class_codes(dn, fired)
    return [CLASSES[i] for i in codes.tolist()]


def class_codes(dn: torch.Tensor, fired: torch.Tensor | None = None) -> torch.Tensor:
    """``[F]`` int64 index into :data:`CLASSES` (vectorised form of :func:`classify`)."""
    out = torch.full_like(dn, CLASSES.index(OTHER), dtype=torch.int64)
    out[(dn >= 0.4) & (dn <= 0.6)] = CLASSES.index(SHARED)
    out[dn < 0.1] = CLASSES.index(BASE_ONLY)
    out[dn > 0.9] = CLASSES.index(CHAT_ONLY)
    if fired is not None:
        out[~fired.to(device=out.device, dtype=torch.bool)] = CLASSES.index(DEAD)
    return out


def decoder_cosine(W_dec: torch.Tensor) -> torch.Tensor:
    """Cosine of ``d_j^b`` and ``d_j^c`` per latent; ``W_dec [2, F, d]`` -> ``[F]`` (0 where a row is zero)."""
    return torch.nn.functional.cosine_similarity(W_dec[0], W_dec[1], dim=-1, eps=1e-12)


def decoder_stats(W_dec: torch.Tensor, fired: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Norms, Δnorm, class codes and cosine of every latent, from ``W_dec [2, F, d]`` (normalised space);
    with ``fired [F]`` (bool: fired on the analysed tokens) the latents that never fired are class dead."""
    norms = W_dec.detach().float().norm(dim=-1)
    dn = delta_norm(norms[0], norms[1])
    return {"norm_base": norms[0], "norm_chat": norms[1], "delta_norm": dn,
            "class_code": class_codes(dn, fired), "cosine": decoder_cosine(W_dec.detach().float())}
