"""Evaluation metrics of DESIGN §1 ("Metrics"), accumulated over batches in float64."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ReconstructionStats:
    """Streaming FVE per model, MSE, L0 and dead fraction over held-out batches.

    ``FVE_m = 1 − Σ_n ||x_m − x̂_m||² / Σ_n ||x_m − mean_n(x_m)||²`` with the total variance from float64
    sums (``Σ||x||² − n ||mean||²``), so the batch order and size do not matter.
    """

    def __init__(self, d_model: int, dict_size: int, device=None):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_x = torch.zeros(2, d_model, **f64)
        self.sum_sq = torch.zeros(2, **f64)
        self.sum_err = torch.zeros(2, **f64)
        self.active = 0
        self.fired = torch.zeros(dict_size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor) -> None:
        """``x, x_hat [batch, 2, d]`` in the same units; ``latents [nnz]``: indices of the active codes."""
        x64, xh64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum(dim=(0, 2))
        self.sum_err += (x64 - xh64).pow(2).sum(dim=(0, 2))
        self.active += int(latents.numel())
        self.fired[latents] = True

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        total_var = self.sum_sq - self.sum_x.pow(2).sum(-1) / self.n
        fve = 1.0 - self.sum_err / total_var
        return {
            "fve_base": float(fve[0]),
            "fve_chat": float(fve[1]),
            "mse": float(self.sum_err.sum() / self.n),
            "l0": self.active / self.n,
            "dead_fraction": dead_fraction(self.fired),
            "tokens": self.n,
        }


def dead_fraction(fired: torch.Tensor) -> float:
    """Share of latents that never fired on the evaluation tokens; ``fired [F]`` bool."""
    return float(1.0 - fired.float().mean())


@torch.no_grad()
def evaluate(model, batches: Iterable[torch.Tensor], *, batch_topk: bool | None = None,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """FVE per model, MSE (normalised units), L0 and dead fraction of ``model`` over ``batches`` of
    ``[batch, 2, d]`` activations in model units. BatchTopK uses its inference threshold unless
    ``batch_topk`` (needed before a threshold exists)."""
    stats = None
    for x in batches:
        x = x.to(model.W_enc.device)
        with _autocast(x.device, autocast_dtype):
            xn = model.normalise(x)
            codes = model.encode_sparse(xn, batch_topk=batch_topk, normalised=True)
            x_hat = model.decode_normalised(codes)
        if stats is None:
            stats = ReconstructionStats(model.cfg.d_model, model.cfg.dict_size, device=x.device)
        stats.update(xn, x_hat, codes.latents)
    if stats is None:
        raise ValueError("no evaluation batches")
    return stats.result()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
