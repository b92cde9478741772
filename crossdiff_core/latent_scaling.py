"""Latent Scaling (DESIGN §1): β per latent and target, ν_ε, ν_r, the ν rank and the two filters.

For latent ``j`` with direction ``D_j`` (a decoder row) and target ``y``, the least-squares fit of
``y_n ≈ β f_j(n) D_j`` over tokens ``n`` is

    β_j = D_jᵀ (Σ_n f_j(n) y_n) / (||D_j||² Σ_n f_j(n)²).

Four targets, in the crosscoder's normalised space (where both models have the same scale):

* error, model m:          ``y = (x_m − x̂_m) + f_j d_j^m``  (the error plus the latent's own part)
* reconstruction, model m: ``y = x̂_m`` (including ``b_dec[m]``)

so the numerators are ``Σ_n f_j(n) (e_m(n)·D_j) + (d_j^m·D_j) Σ_n f_j(n)²`` and ``Σ_n f_j(n) (x̂_m(n)·D_j)``.
:class:`LatentScaling` accumulates them for every latent at once in float64, batch by batch; the per-batch
diagonal ``Σ_n f_j(n) (y_n·D_j)`` of ``fᵀ (Y Dᵀ)`` is computed as ``((fᵀ Y) ⊙ D).sum(-1)``: the same
sums, but ``fᵀ Y`` is one ``[F,N]×[N,4d]`` product for all four targets (the flops of the ``[N,d]×[d,F]``
products), and for sparse codes a sparse product whose cost scales with the active codes only.

``ν_ε = β_ε^b / β_ε^c`` (Complete Shrinkage when high), ``ν_r = β_r^b / β_r^c`` (Latent Decoupling when
high); a chat-only latent is genuinely chat-specific when both are low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .crosscoder import Codes
from .decoder_norms import BASE_ONLY, CLASSES, SHARED
from .errors import ConfigError

TARGETS = ("error_base", "error_chat", "recon_base", "recon_chat")
DIRECTIONS = ("auto", "chat", "base")
NU_ERROR_MAX = 0.2  # DESIGN §1 defaults of the fixed filter
NU_RECON_MAX = 0.5
SHARED_COVERAGE = 0.95  # the data-driven cut: central interval of the shared latents' ν
MIN_SHARED_FIRES = 100  # shared latents firing less often give erratic ν and stay out of that interval

# Codes denser than dense_above(d) go through dense products (fᵀY, the decode, the statistics), sparser ones
# through sparse ones (cost ∝ active codes, plus a nonzero over [N, F]). Measured on the whole L1 analysis
# pass (2 threads, F = 8d), dense / sparse time at 2% / 5% / 10% density: d=32 0.83 / 0.62 / 0.44,
# d=64 1.04 / 0.79 / 0.51, d=128 1.31 / 0.95 / 0.57, d=256 1.39 / 0.89 / 0.65.
def dense_above(d_model: int) -> float:
    """The code density above which dense products are cheaper, for activations of width ``d_model``."""
    return min(0.04, d_model / 4096)


def sparse_codes(f: torch.Tensor) -> Codes:
    """Dense codes ``f [N, F]`` -> :class:`Codes` of their nonzero entries (sorted by row)."""
    rows, lat = f.nonzero(as_tuple=True)
    return Codes(f[rows, lat], rows, lat, f.shape[0])


def use_dense(nnz: int, n_tokens: int, dict_size: int, d_model: int) -> bool:
    """Whether codes with ``nnz`` active entries are cheaper to process dense (see :func:`dense_above`)."""
    return nnz > dense_above(d_model) * n_tokens * dict_size


def direction_models(class_codes: torch.Tensor, direction: str = "auto") -> torch.Tensor:
    """Which model's decoder row is each latent's direction: ``[F]`` int64, 0 = base, 1 = chat.

    ``"chat"``: ``d_j^c`` for every latent; ``"base"``: ``d_j^b``; ``"auto"``: ``d_j^b`` for base-only
    latents (their chat row is ~0) and ``d_j^c`` otherwise. ``class_codes`` indexes
    :data:`~crossdiff_core.decoder_norms.CLASSES`.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    out = torch.ones_like(class_codes, dtype=torch.int64)
    if direction == "base":
        out.zero_()
    elif direction == "auto":
        out[class_codes == CLASSES.index(BASE_ONLY)] = 0
    return out


class LatentScaling:
    """Streaming Latent Scaling sums for every latent and the four :data:`TARGETS`.

    ``W_dec [2, F, d]`` (normalised space), ``dir_model [F]`` (0 = base row, 1 = chat row, see
    :func:`direction_models`). Call :meth:`update` once per batch. Each batch's products are float32 and
    the running sums float64 and additive, so the batch size and the order of batches change the result
    only by float32 round-off (~1e-6 relative); :meth:`merge` adds the sums of another accumulator (one
    per shard or per worker). Memory: ``O(F)`` plus one batch and one ``[block, 4d]`` product.
    """

    def __init__(self, W_dec: torch.Tensor, dir_model: torch.Tensor, *, mode: str = "auto",
                 chunk_elems: int = 1 << 24):
        if W_dec.ndim != 3 or W_dec.shape[0] != 2:
            raise ConfigError(f"W_dec must be [2, F, d], got {list(W_dec.shape)}")
        if mode not in ("auto", "dense", "sparse"):
            raise ConfigError(f"mode must be 'auto', 'dense' or 'sparse', got {mode!r}")
        W = W_dec.detach().float()
        F, d = W.shape[1], W.shape[2]
        dir_model = dir_model.to(device=W.device, dtype=torch.int64)
        if dir_model.shape != (F,):
            raise ConfigError(f"dir_model must be [F={F}], got {list(dir_model.shape)}")
        self.F, self.d, self.mode, self.chunk_elems = F, d, mode, int(chunk_elems)
        self.D = W[dir_model, torch.arange(F, device=W.device)].contiguous()  # [F, d] directions
        self.D_sq = self.D.double().pow(2).sum(-1)  # [F] ||D_j||²
        self.own = (W.double() * self.D.double()).sum(-1)  # [2, F] d_j^m · D_j (own-contribution term)
        f64 = dict(dtype=torch.float64, device=W.device)
        self.num = torch.zeros(4, F, **f64)  # Σ_n f_j(n) (y_n · D_j) without the own term; rows = TARGETS
        self.sum_f2 = torch.zeros(F, **f64)  # Σ_n f_j(n)²
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes: Codes | torch.Tensor, xn: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Add one batch: ``codes`` (sparse :class:`Codes` or dense ``[N, F]``), ``xn`` and ``x_hat``
        ``[N, 2, d]``, both in normalised units (``x_hat`` from the same codes, with ``b_dec``).

        ``mode="auto"`` keeps dense codes dense and turns sparse ones dense above :func:`dense_above`."""
        N = xn.shape[0]
        if xn.shape != (N, 2, self.d) or x_hat.shape != xn.shape:
            raise ConfigError(f"xn and x_hat must both be [N, 2, {self.d}], got {list(xn.shape)} and {list(x_hat.shape)}")
        # the four targets without the own term, side by side: [e_b | e_c | x̂_b | x̂_c] -> [N, 4d]
        Y = torch.cat([xn - x_hat, x_hat], dim=1).to(torch.float32).reshape(N, 4 * self.d)
        dense = isinstance(codes, torch.Tensor)
        if dense and codes.shape != (N, self.F):
            raise ConfigError(f"dense codes must be [N={N}, F={self.F}], got {list(codes.shape)}")
        # auto: dense codes stay dense (the caller chose), sparse ones go dense only when dense enough
        dense_path = self.mode == "dense" or (
            self.mode == "auto" and (dense or use_dense(codes.values.numel(), N, self.F, self.d)))
        if dense_path:
            f = (codes if dense else codes.to_dense(self.F)).to(torch.float32)
            self.sum_f2 += (f * f).sum(0).double()
        else:
            if dense:
                codes = sparse_codes(codes)
            v = codes.values.to(torch.float32)
            self.sum_f2.index_add_(0, codes.latents, v.double().pow(2))
        # Σ_n f_j(n) Y_n = (fᵀ Y)_j, then · D_j: the diagonal of fᵀ (Y_t Dᵀ) for every target t at once,
        # in blocks of latents so the [block, 4d] product stays bounded
        step = max(1, self.chunk_elems // (4 * self.d))
        for a in range(0, self.F, step):
            b = min(self.F, a + step)
            if dense_path:
                S = f[:, a:b].T @ Y  # [block, 4d]: one [block,N]x[N,4d] product
            else:
                sel = (codes.latents >= a) & (codes.latents < b) if (a, b) != (0, self.F) else slice(None)
                idx = torch.stack([codes.latents[sel] - a, codes.rows[sel]])
                fT = torch.sparse_coo_tensor(idx, v[sel], (b - a, N), check_invariants=False)
                S = torch.sparse.mm(fT, Y)  # cost ∝ nnz·4d
            self.num[:, a:b] += (S.view(b - a, 4, self.d) * self.D[a:b, None, :]).sum(-1).T.double()
        self.n_tokens += N

    def merge(self, other: "LatentScaling") -> "LatentScaling":
        """Add ``other``'s sums (same crosscoder and directions) into this one; returns self."""
        if other.F != self.F or not torch.equal(other.D, self.D):
            raise ConfigError("cannot merge Latent Scaling sums of different crosscoders or directions")
        self.num += other.num
        self.sum_f2 += other.sum_f2
        self.n_tokens += other.n_tokens
        return self

    def betas(self) -> dict[str, torch.Tensor]:
        """β for each of :data:`TARGETS`: ``{name: [F] float64}``; NaN where the latent never fired
        (``Σ f² = 0``) or its direction is the zero vector."""
        num = self.num.clone()
        num[:2] += self.own * self.sum_f2  # the error targets' own contribution f_j d_j^m
        den = self.D_sq * self.sum_f2
        beta = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                           torch.full_like(num, float("nan")))
        return dict(zip(TARGETS, beta))


def nu(beta_base: torch.Tensor, beta_chat: torch.Tensor) -> torch.Tensor:
    """``ν = β^b / β^c`` per latent (``[F]``); NaN where either β is NaN or ``β^c = 0``."""
    out = beta_base / beta_chat
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("nan")))


@dataclass
class NuResult:
    """ν of every latent and its rank: ``[F]`` float64 each."""

    nu_error: torch.Tensor
    nu_recon: torch.Tensor
    nu_rank: torch.Tensor


def _ordinal_rank(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """1-based ordinal rank of ``x [F]`` within each group (ties broken by index); NaN where x is NaN."""
    ok = ~torch.isnan(x)
    idx = torch.nonzero(ok).squeeze(1)
    # sort by (group, value, index): a stable sort by value, then a stable sort by group
    o = idx[torch.sort(x[idx], stable=True).indices]
    o = o[torch.sort(groups[o], stable=True).indices]
    g = groups[o]
    start = torch.searchsorted(g, g, right=False)  # first position of each element's group
    ranks = torch.full_like(x, float("nan"), dtype=torch.float64)
    ranks[o] = (torch.arange(o.numel(), device=x.device) - start + 1).double()
    return ranks


def nu_rank(nu_error: torch.Tensor, nu_recon: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``rank(ν_ε) + rank(ν_r)`` per latent, lower = more chat-specific.

    Ranks are 1-based and ascending (the lowest ν gets 1; ties by latent index), computed only over the
    latents whose two ν are both finite and, when ``groups [F]`` (e.g. the class codes) is given, within
    each group, so that for the chat-only class the rank is the paper's ranking of chat-only latents.
    A latent with a NaN ν (never fired) gets a NaN rank, which sorts last.
    """
    g = torch.zeros_like(nu_error, dtype=torch.int64) if groups is None else groups.to(torch.int64)
    both = torch.isfinite(nu_error) & torch.isfinite(nu_recon)
    nan = torch.full_like(nu_error, float("nan"), dtype=torch.float64)
    r_e = _ordinal_rank(torch.where(both, nu_error.double(), nan), g)
    r_r = _ordinal_rank(torch.where(both, nu_recon.double(), nan), g)
    return r_e + r_r


def compute_nu(betas: dict[str, torch.Tensor], class_codes: torch.Tensor | None = None) -> NuResult:
    """ν_ε, ν_r and the ν rank (within each class when ``class_codes`` is given) from :meth:`LatentScaling.betas`."""
    ne = nu(betas["error_base"], betas["error_chat"])
    nr = nu(betas["recon_base"], betas["recon_chat"])
    return NuResult(ne, nr, nu_rank(ne, nr, class_codes))


def fixed_filter(nu_error: torch.Tensor, nu_recon: torch.Tensor, *, nu_error_max: float = NU_ERROR_MAX,
                 nu_recon_max: float = NU_RECON_MAX) -> torch.Tensor:
    """``[F]`` bool: ``ν_ε < nu_error_max`` and ``ν_r < nu_recon_max`` (NaN fails)."""
    return (nu_error < nu_error_max) & (nu_recon < nu_recon_max)


def shared_interval(nu_values: torch.Tensor, shared: torch.Tensor, coverage: float = SHARED_COVERAGE) -> tuple[float, float]:
    """Central ``coverage`` interval of ``nu_values`` over the ``shared [F]`` latents with a finite ν:
    the ``(1−coverage)/2`` and ``(1+coverage)/2`` quantiles (linear interpolation). ``(nan, nan)`` when no
    shared latent has a finite ν."""
    if not 0 < coverage < 1:
        raise ConfigError(f"coverage must be in (0, 1), got {coverage}")
    v = nu_values[shared & torch.isfinite(nu_values)].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    q = torch.quantile(v, torch.tensor([(1 - coverage) / 2, (1 + coverage) / 2], dtype=torch.float64, device=v.device))
    return float(q[0]), float(q[1])


@dataclass
class DataDrivenCut:
    """The data-driven filter: the shared latents' ν intervals and the latents below both lower ends."""

    coverage: float
    nu_error_interval: tuple[float, float]
    nu_recon_interval: tuple[float, float]
    n_shared: int  # shared latents in the reference set (both ν finite)
    passed: torch.Tensor  # [F] bool


def data_driven_filter(nu_error: torch.Tensor, nu_recon: torch.Tensor, class_codes: torch.Tensor, *,
                       coverage: float = SHARED_COVERAGE, reference: torch.Tensor | None = None) -> DataDrivenCut:
    """A latent passes when its ν_ε is below the lower end of the shared latents' central ``coverage``
    interval of ν_ε AND its ν_r is below the lower end of theirs: it is less present in the base model
    than (almost) any shared latent is. ``reference [F]`` (bool) restricts which shared latents form the
    interval (e.g. those that fired often enough for a stable ν). Empty when no shared latent qualifies."""
    shared = (class_codes == CLASSES.index(SHARED)) & torch.isfinite(nu_error) & torch.isfinite(nu_recon)
    if reference is not None:
        shared &= reference.to(torch.bool)
    ie = shared_interval(nu_error, shared, coverage)
    ir = shared_interval(nu_recon, shared, coverage)
    passed = (nu_error < ie[0]) & (nu_recon < ir[0])  # NaN bounds or values fail
    return DataDrivenCut(coverage, ie, ir, int(shared.sum()), passed)
