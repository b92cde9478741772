"""The sparse training step (issue 14): every product after the encoder's forward pass costs ∝ the active codes.

Notation (normalised units): ``X [B, 2d]`` the batch (base | chat side by side), ``W_enc`` as ``[2d, F]``,
``pre = X W_enc + b_enc [B, F]`` (the one dense product; the caller computes it and selects), the active
entries ``E = {(n_e, j_e)}`` (``nnz`` of them, sorted by token) with values ``f_e = pre[n_e, j_e] > 0``,
``W_dec [2, F, d]``. Given ``g_m(n) = ∂L/∂x̂_m(n)``:

- decoder forward   ``x̂_m(n) = Σ_{e: n_e = n} f_e W_dec[m, j_e]``            (``embedding_bag``, ∝ nnz·2d)
- code gradient     ``∂L/∂f_e = Σ_m g_m(n_e) · W_dec[m, j_e]``                (sampled product, SDDMM, ∝ nnz·2d)
- decoder gradient  ``∂L/∂W_dec[m, j] = Σ_{e: j_e = j} f_e g_m(n_e)``         (``embedding_bag`` by latent, ∝ nnz·2d)
- encoder gradient  ``∂L/∂W_enc[:, j] = Σ_{e: j_e = j} ∂L/∂f_e X(n_e)``, ``∂L/∂b_enc[j] = Σ_{e: j_e = j} ∂L/∂f_e``:
  the pre-activation gradient is ``∂L/∂f_e`` on ``E`` and 0 elsewhere (ReLU passes 1 on kept entries,
  BatchTopK's selection 0 off them), so ``∂L/∂W_enc = Xᵀ G_sparse`` costs ∝ nnz·2d, not B·F·2d.
- AuxK: the dead latents' columns ``pre[:, D]`` come out dense (``[B, n_dead]``, usually a tenth of F or
  less, with ``aux_k`` of them per token: too dense for sparse kernels); their gradient ``G_D`` adds
  ``Xᵀ G_D`` to the columns ``D`` of ``∂L/∂W_enc`` and ``Σ_n G_D`` to ``b_enc[D]``.

So a step costs one dense ``[B, 2d] × [2d, F]`` product (4·d·F FLOPs a token) plus memory-bound gathers
∝ nnz·2d, against the dense step's five products (20·d·F). The gathers run in the weights' dtype (float32
under bf16 autocast: they are not matmuls, and autocast would not narrow them); the encoder product and
the AuxK products follow autocast as in the dense step.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from .crosscoder_formulas import Codes, sparse_decode
from .errors import ConfigError

STEPS = ("auto", "dense", "sparse")


# The code density (nnz / (B·F)) below which the sparse step is faster. Measured on whole training steps
# (loss, backward, clipping, Adam; 2 threads, float32, BatchTopK with AuxK on 10% dead latents, a shared and
# heavily loaded CPU), dense / sparse seconds per step at densities 0.78% / 1.6% / 3.1% / 6.3%:
#   d=256 F=4096 B=2048:  1.50 / 1.33 / 1.31 / 1.32
#   d=576 F=8192 B=1024:  2.47 / 1.66 / 1.22 / 0.82
# The sparse step saves 16·d·F FLOPs a token of GEMM for ~4 gathers of 2d floats per active code, so the
# crossover density depends little on d or F; 4% sits below both measured crossovers (> 6% and ~5%). At the
# paper's k/F = 100/73,728 = 0.14% the sparse step wins by far (BENCHMARKS.md, "Paper-scale training").
SPARSE_BELOW = 0.04


def sparse_below(d_model: int, dict_size: int) -> float:
    """The code density below which the sparse step is cheaper (see :data:`SPARSE_BELOW`)."""
    del d_model, dict_size  # measured crossover is flat in the shape
    return SPARSE_BELOW


def use_sparse(products: str | None, nnz: int, batch: int, dict_size: int, d_model: int) -> bool:
    """Whether the step with ``nnz`` active codes of ``batch × dict_size`` runs sparse; ``products`` forces it
    (``"dense"``/``"sparse"``) or lets the measured density decide (``"auto"``/``None``)."""
    if products not in (None, *STEPS):
        raise ConfigError(f"products must be one of {STEPS} (how the training step computes), got {products!r}")
    if products == "dense":
        return False
    if products == "sparse":
        return True
    return nnz < sparse_below(d_model, dict_size) * batch * dict_size


# Latents per block of W_dec's gradient: each block's [block, 2d] sum is written straight into the
# gradient's [2, F, d] layout, so no full-size [F, 2d] temporary (1.4 GB at the paper's shape) is ever held.
GRAD_BLOCK = 8192


class SparseLayout(NamedTuple):
    """Index bookkeeping of the active entries, built once per step and shared by both directions.

    ``rows, latents [nnz]`` sorted by row; ``row_offsets [B]`` (start of each token's entries);
    ``crow [B+1]`` (CSR row pointer); ``by_latent [nnz]`` (a stable permutation sorting by latent);
    ``latent_offsets [F]`` (start of each latent's entries in that order); ``block`` latents per
    gradient block."""

    rows: torch.Tensor
    latents: torch.Tensor
    row_offsets: torch.Tensor
    crow: torch.Tensor
    by_latent: torch.Tensor
    latent_offsets: torch.Tensor
    batch: int
    dict_size: int
    block: int


def sparse_layout(rows: torch.Tensor, latents: torch.Tensor, batch: int, dict_size: int,
                  block: int | None = None) -> SparseLayout:
    """The :class:`SparseLayout` of entries ``(rows, latents) [nnz]`` sorted by row (as ``nonzero`` gives)."""
    row_end = torch.bincount(rows, minlength=batch).cumsum(0)
    crow = torch.cat([row_end.new_zeros(1), row_end])
    by_latent = torch.sort(latents, stable=True).indices
    lat_counts = torch.bincount(latents, minlength=dict_size)
    return SparseLayout(rows, latents, crow[:-1], crow, by_latent, lat_counts.cumsum(0) - lat_counts,
                        batch, dict_size, block or GRAD_BLOCK)


def _sum_by_latent(lay: SparseLayout, table: torch.Tensor, weights: torch.Tensor, dead: torch.Tensor,
                   dead_rows: torch.Tensor | None, write) -> None:
    """``out[j] = Σ_{e: j_e = j} weights_e table[n_e]`` (``table [B, k]``, one bag per latent), plus
    ``dead_rows [n_dead, k]`` on the ``dead`` latents (sorted), handed over block by block:
    ``write(j0, j1, out[j0:j1])``."""
    F, nnz = lay.dict_size, lay.rows.numel()
    rows_by_lat, w_by_lat = lay.rows[lay.by_latent], weights[lay.by_latent]
    starts = list(range(0, F, lay.block))
    # one host sync for every block's bounds (entries and dead latents are sorted by latent)
    e_at = torch.cat([lay.latent_offsets[starts], lay.latent_offsets.new_tensor([nnz])]).tolist()
    d_at = torch.searchsorted(dead, torch.tensor(starts + [F], device=dead.device)).tolist()
    for i, j0 in enumerate(starts):
        j1, (s, e), (a, b) = min(F, j0 + lay.block), e_at[i:i + 2], d_at[i:i + 2]
        out = Fn.embedding_bag(rows_by_lat[s:e], table, lay.latent_offsets[j0:j1] - s, mode="sum",
                               per_sample_weights=w_by_lat[s:e])
        if dead_rows is not None and b > a:
            out.index_add_(0, dead[a:b] - j0, dead_rows[a:b].to(out.dtype))
        write(j0, j1, out)


class EncoderGather(torch.autograd.Function):
    """``(W_enc [2,d,F], b_enc [F], X [B,2d], pre [B,F], lay, dead [n_dead]) -> (f [nnz], pre_dead [B, n_dead])``.

    ``f = pre[rows, latents]`` (in the weights' dtype) and ``pre_dead = pre[:, dead]`` (in ``pre``'s dtype),
    where ``pre = X W_enc + b_enc`` was computed without autograd; the backward is the module docstring's
    encoder gradient. ``X`` and ``pre`` get no gradient."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, X, pre, lay: SparseLayout, dead: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(X, dead)
        ctx.lay, ctx.w_shape, ctx.w_dtype, ctx.b_dtype = lay, W_enc.shape, W_enc.dtype, b_enc.dtype
        f = pre[lay.rows, lay.latents].to(W_enc.dtype)
        return f, pre[:, dead]

    @staticmethod
    def backward(ctx, g_f, g_dead):
        X, dead = ctx.saved_tensors
        lay = ctx.lay
        F = lay.dict_size
        g_f = X.new_zeros(lay.rows.numel(), dtype=ctx.w_dtype) if g_f is None else g_f.to(ctx.w_dtype)
        gb = torch.zeros(F, dtype=ctx.b_dtype, device=X.device).index_add_(0, lay.latents, g_f.to(ctx.b_dtype))
        rows_dead = None
        if g_dead is not None and dead.numel():
            # as autocast runs the dense step's product: in the dtype the forward's pre had
            rows_dead = g_dead.t() @ X.to(g_dead.dtype)  # [n_dead, 2d]
            gb.index_add_(0, dead, g_dead.sum(0, dtype=torch.float32).to(ctx.b_dtype))
        # one gather-sum over every latent writes the gradient as [F, 2d]: W_enc's own memory layout
        # (CrossCoder lays it out so), hence no transposed copy; it is the gradient, not a temporary
        parts: list[torch.Tensor] = []
        _sum_by_latent(lay._replace(block=F), X.to(ctx.w_dtype), g_f, dead, rows_dead,
                       lambda j0, j1, out: parts.append(out))
        gW = parts[0].t().view(ctx.w_shape)  # [2, d, F] with [F, 2d] strides
        return gW, gb, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """``(f [nnz], W_dec [2,F,d], lay, dead [n_dead]) -> (x̂ [B,2,d] without b_dec, W_dec rows of dead [n_dead, 2d])``:
    the module docstring's decoder forward and its backward into the codes (SDDMM) and the touched
    decoder rows; the dead latents' rows (for AuxK) get their gradient added in the same pass."""

    @staticmethod
    def forward(ctx, f, W_dec, lay: SparseLayout, dead: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(f, W_dec, dead)
        ctx.lay = lay
        x_hat = sparse_decode(Codes(f, lay.rows, lay.latents, lay.batch), W_dec, None)
        return x_hat, W_dec[:, dead].transpose(0, 1).reshape(dead.numel(), 2 * W_dec.shape[2])

    @staticmethod
    def backward(ctx, g, g_dead):
        f, W_dec, dead = ctx.saved_tensors
        lay = ctx.lay
        if g is None:
            g = W_dec.new_zeros(lay.batch, 2, W_dec.shape[2])
        g = g.to(W_dec.dtype)
        g_f = gW = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only its SDDMM
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(lay.crow, lay.latents, torch.ones_like(f, dtype=W_dec.dtype),
                                                  (lay.batch, lay.dict_size), check_invariants=False)
                g_f = sum(torch.sparse.sampled_addmm(pattern, g[:, m].contiguous(), W_dec[m].t(), beta=0.0).values()
                          for m in range(2)).to(f.dtype)
        if ctx.needs_input_grad[1]:
            two, F, d = W_dec.shape
            gW = torch.empty_like(W_dec)
            # rows of g [B, 2d] sum to [block, 2, d] blocks, written into W_dec's [2, F, d]
            _sum_by_latent(lay, g.reshape(lay.batch, two * d), f.to(W_dec.dtype), dead,
                           None if g_dead is None or not dead.numel() else g_dead,
                           lambda j0, j1, out: gW[:, j0:j1].copy_(out.view(j1 - j0, two, d).transpose(0, 1)))
        return g_f, gW, None, None


def sparse_codes_step(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, X: torch.Tensor,
                      pre: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor,
                      dead: torch.Tensor | None = None, block: int | None = None):
    """The sparse step's differentiable pieces: ``(f [nnz], x̂ [B,2,d] without b_dec, pre_dead [B, n_dead],
    dec_dead [n_dead, 2d])``, the last two the AuxK latents' pre-activations and decoder rows.

    ``X [B, 2d]`` normalised inputs, ``pre = X W_enc + b_enc [B, F]`` (no autograd needed), active entries
    ``(rows, latents)`` sorted by row, ``dead`` the AuxK latents (sorted int64 indices; empty or None:
    none), ``block`` latents per gradient block (default :data:`GRAD_BLOCK`).
    Gradients reach ``W_enc, b_enc`` (through ``f`` and ``pre_dead``) and ``W_dec`` (through ``x̂`` and
    ``dec_dead``)."""
    B, F = pre.shape
    lay = sparse_layout(rows, latents, B, F, block)
    if dead is None:
        dead = torch.zeros(0, dtype=torch.int64, device=pre.device)
    f, pre_dead = EncoderGather.apply(W_enc, b_enc, X, pre.detach(), lay, dead)
    x_hat, dec_dead = SparseDecode.apply(f, W_dec, lay, dead)
    return f, x_hat, pre_dead, dec_dead
