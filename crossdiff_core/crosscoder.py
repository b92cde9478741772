"""The acausal crosscoder of DESIGN §1: one layer, two models, L1 or BatchTopK sparsity, and two partitioned
kinds: ``shared`` (L1 with designated latents whose decoder is tied across the models and whose L1 weight is
``shared_l1_ratio``) and ``dfc`` (BatchTopK with latents exclusive to one model, which read and write that
model only). The layout of the latent blocks is :meth:`CrossCoderConfig.partition`.

Weights act on normalised inputs ``x_m / s_m``; every public method takes and returns activations in
the models' own units. Shapes: ``x [batch, 2, d]`` (index 0 = base, 1 = chat), codes ``f [batch, F]``.
Its settings live in :mod:`crossdiff_core.crosscoder_config`, its formulas and sparse codes in
:mod:`crossdiff_core.crosscoder_formulas`, the sparse training step in :mod:`crossdiff_core.sparse_step`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as Fn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .crosscoder_config import KINDS, SPARSITY, CrossCoderConfig, CrossCoderSettings, read_config_json
from .crosscoder_formulas import (Codes, batch_kth_largest, batch_top_entries, firing_counts, l1_penalty,
                                  reconstruction_loss, sparse_decode)
from .errors import ConfigError, CrossdiffError
from .fileio import atomic_write, file_sha256
from .sparse_step import sparse_codes_step, use_sparse

# the settings and formulas stay importable from here (cli, trainer, tests and benches import them so)
__all__ = ["KINDS", "SPARSITY", "Codes", "CrossCoder", "CrossCoderConfig", "CrossCoderSettings", "LocalBatch", "LossOutput",
           "batch_kth_largest", "firing_counts", "l1_penalty", "reconstruction_loss", "sparse_decode"]


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what is minimised
    recon: torch.Tensor  # Σ_m ||x_m − x̂_m||², batch mean, normalised units
    sparsity: torch.Tensor  # λ Σ_j w_j f_j (||d_j^b|| + ||d_j^c||), batch mean (w_j: sparsity_norms; 0 for BatchTopK)
    aux: torch.Tensor  # L_aux (0 unless dead latents are given)
    l0: torch.Tensor  # mean active latents per token
    fired: torch.Tensor  # [F] bool, latents active anywhere in the batch
    x_hat: torch.Tensor  # [batch, 2, d] normalised units, detached
    min_kept_score: torch.Tensor  # BatchTopK: smallest kept v this batch (nan for L1)


class LocalBatch:
    """Batch-wide reductions of the BatchTopK objective over this process's batch (single-process
    training). Data-parallel training swaps in :class:`crossdiff_core.distributed.GlobalBatch`, whose
    reductions span the global batch, through ``CrossCoder.batch_reduce``."""

    def kth_largest(self, v: torch.Tensor, k_per_token: int) -> torch.Tensor:
        """The ``(k_per_token · batch)``-th largest of the scores ``v [batch, F]``."""
        return batch_kth_largest(v.reshape(-1), min(k_per_token * v.shape[0], v.numel()))

    def top_entries(self, v: torch.Tensor, k_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, t)``: :meth:`kth_largest`'s ``t`` and the flat indices (sorted) of the scores ``>= t``."""
        return batch_top_entries(v.reshape(-1), min(k_per_token * v.shape[0], v.numel()))

    def aux_denominator(self, e: torch.Tensor) -> torch.Tensor:
        """``Σ_m ||e_m − mean(e_m)||²`` summed over the batch; ``e [batch, 2, d]``."""
        return (e - e.mean(0, keepdim=True)).pow(2).sum()


class CrossCoder(torch.nn.Module):
    """Crosscoder with ``W_enc [2,d,F]``, ``b_enc [F]``, ``W_dec [2,F,d]``, ``b_dec [2,d]``, ``scales [2]``.

    ``W_enc`` is a view of the parameter ``W_enc_rows [F, 2, d]`` (the layout the sparse step's gradient is
    written in); the saved format (:meth:`save`) and every reader use ``W_enc``.

    The partitioned kinds keep their constraints exactly, at init and through any training that steps with
    :func:`crossdiff_core.trainer.optimisation_step`: ``shared``: ``W_dec[0, j] == W_dec[1, j]`` bit for bit on
    the tied latents (a gradient hook gives both halves the gradient of one tied parameter, the sum of the
    two; :meth:`enforce_constraints` copies the base half over after each step, against any round-off of
    the optimiser); ``dfc``: ``W_dec[other, j] == 0`` and ``W_enc[other, :, j] == 0`` on the exclusive latents
    (the hooks zero their gradients). :meth:`load` refuses weights that break them."""

    def __init__(self, cfg: CrossCoderConfig, *, scales: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 device=None, dtype: torch.dtype = torch.float32, seed: int | None = 0):
        """``scales [2]``: ``s_m``; ``mean [2, d]``: the data's mean in model units, where ``b_dec`` starts
        when ``cfg.b_dec_init`` is mean (zero without it)."""
        super().__init__()
        self.cfg = cfg
        d, F = cfg.d_model, cfg.dict_size
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(2, F, d, generator=gen, dtype=torch.float32)
        # each model's half of a row gets init_norm, so Δnorm starts at 0.5 for every latent
        w = w / w.norm(dim=-1, keepdim=True) * cfg.init_norm
        blocks = cfg.partition()
        if cfg.kind == "shared":  # the tied latents start (and stay) with one decoder for both models
            w[1, _sl(blocks["tied"])] = w[0, _sl(blocks["tied"])]
        elif cfg.kind == "dfc":  # an exclusive latent reads and writes its own model only
            w[1, _sl(blocks["base_exclusive"])] = 0.0
            w[0, _sl(blocks["chat_exclusive"])] = 0.0
        w = w.to(device=device, dtype=dtype)
        self.W_dec = torch.nn.Parameter(w)
        # the encoder is stored as rows, [F, 2, d] (latent j's encoder row contiguous), and read as W_enc
        # [2, d, F]: the sparse step's encoder gradient is a per-latent gather-sum, which writes rows, so no
        # transposed copy; the product reads the transposed view (BLAS takes either layout)
        self.W_enc_rows = torch.nn.Parameter(w.permute(1, 0, 2).contiguous())
        if cfg.kind in ("shared", "dfc"):
            self.W_dec.register_hook(self._constrain_dec_grad)
        if cfg.kind == "dfc":
            self.W_enc_rows.register_hook(self._constrain_enc_grad)
        self.b_enc = torch.nn.Parameter(torch.zeros(F, device=device, dtype=dtype))
        s = torch.ones(2) if scales is None else torch.as_tensor(scales, dtype=torch.float32).reshape(2)
        if not torch.all(torch.isfinite(s) & (s > 0)):
            raise ConfigError(f"input scales must be finite and positive, got {s.tolist()}")
        b = torch.zeros(2, d)
        if mean is not None and cfg.b_dec_init == "mean":
            # the mean is reconstructed by the bias from the first step, not by latents that fire on every token
            b = torch.as_tensor(mean, dtype=torch.float64).reshape(2, d).div(s.double()[:, None]).float()
        self.b_dec = torch.nn.Parameter(b.to(device=device, dtype=dtype))
        self.register_buffer("scales", s.to(device=device, dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float("nan"), device=device, dtype=torch.float32))
        self.batch_reduce = LocalBatch()  # where the batch-wide selection and sums are taken

    @property
    def W_enc(self) -> torch.Tensor:
        """``[2, d, F]``: the encoder, a view of the parameter ``W_enc_rows [F, 2, d]`` (reads and in-place
        writes go to it; its gradient lands on ``W_enc_rows``)."""
        return self.W_enc_rows.permute(1, 2, 0)

    # ---- units -------------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, 2, d]`` model units -> normalised units (weights' dtype)."""
        self._check_input(x)
        return (x.to(self.W_enc.dtype) / self.scales.to(self.W_enc.dtype)[None, :, None])

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scales.to(x.dtype)[None, :, None]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != 2 or x.shape[2] != self.cfg.d_model:
            raise ConfigError(
                f"crosscoder expects activations shaped [batch, 2, {self.cfg.d_model}] (base, chat); got "
                f"{list(x.shape)}: check that the cache's d_model matches the crosscoder's"
            )

    # ---- the partition (shared, dfc) ---------------------------------------------------------
    def partition(self) -> dict[str, range]:
        """Block name -> its latents (:meth:`CrossCoderConfig.partition`): ``tied``/``free`` (shared),
        ``base_exclusive``/``chat_exclusive``/``shared`` (dfc), ``free`` (l1, batchtopk)."""
        return self.cfg.partition()

    def _constrain_dec_grad(self, g: torch.Tensor) -> torch.Tensor:
        """``W_dec``'s gradient ``[2, F, d]`` as the constraints have it: on the tied latents both halves get
        ``g[0] + g[1]`` (the gradient of one parameter used for both models), so that Adam's elementwise
        update is the same for both; an exclusive latent's other-model half gets 0."""
        blocks = self.cfg.partition()
        g = g.clone()
        if self.cfg.kind == "shared":
            t = _sl(blocks["tied"])
            g[:, t] = g[0, t] + g[1, t]
        else:
            g[1, _sl(blocks["base_exclusive"])] = 0.0
            g[0, _sl(blocks["chat_exclusive"])] = 0.0
        return g

    def _constrain_enc_grad(self, g: torch.Tensor) -> torch.Tensor:
        """``W_enc_rows``'s gradient ``[F, 2, d]`` (dfc): an exclusive latent does not read the other model."""
        blocks = self.cfg.partition()
        g = g.clone()
        g[_sl(blocks["base_exclusive"]), 1] = 0.0
        g[_sl(blocks["chat_exclusive"]), 0] = 0.0
        return g

    @torch.no_grad()
    def enforce_constraints(self) -> None:
        """Set the constrained weights to what the constraints say (after an optimiser step): the tied latents'
        chat half to their base half (shared), the exclusive latents' other-model weights to 0 (dfc). With the
        gradient hooks this changes nothing but round-off an optimiser might make differently at two positions."""
        blocks = self.cfg.partition()
        if self.cfg.kind == "shared":
            t = _sl(blocks["tied"])
            self.W_dec[1, t] = self.W_dec[0, t]
        elif self.cfg.kind == "dfc":
            b, c = _sl(blocks["base_exclusive"]), _sl(blocks["chat_exclusive"])
            self.W_dec[1, b] = 0.0
            self.W_dec[0, c] = 0.0
            self.W_enc[1, :, b] = 0.0
            self.W_enc[0, :, c] = 0.0

    def constraint_violations(self, W_enc: torch.Tensor | None = None, W_dec: torch.Tensor | None = None) -> list[str]:
        """What breaks this kind's constraints in ``W_enc [2, d, F]`` and ``W_dec [2, F, d]`` (default: the
        model's own weights), one line each; empty when they hold (always for l1 and batchtopk)."""
        W_enc = self.W_enc if W_enc is None else W_enc
        W_dec = self.W_dec if W_dec is None else W_dec
        blocks, out = self.cfg.partition(), []
        if self.cfg.kind == "shared":
            t = _sl(blocks["tied"])
            n = int((W_dec[0, t] != W_dec[1, t]).any(-1).sum())
            if n:
                out.append(f"{n} of the {len(blocks['tied'])} tied latents (0..{t.stop - 1}) have W_dec[0, j] != W_dec[1, j]")
        elif self.cfg.kind == "dfc":
            for name, other, model in (("base_exclusive", 1, "chat"), ("chat_exclusive", 0, "base")):
                r = _sl(blocks[name])
                for w, where in ((W_dec[other, r], f"W_dec[{other}]"), (W_enc[other][:, r].t(), f"W_enc[{other}]")):
                    n = int((w != 0).any(-1).sum())
                    if n:
                        out.append(f"{n} {name} latents ({r.start}..{r.stop - 1}) have non-zero {model} weights "
                                   f"{where}")
        return out

    # ---- pieces ------------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        """``[2, F]`` norms of the decoder rows ``||d_j^b||, ||d_j^c||`` (normalised space)."""
        return self.W_dec.norm(dim=-1)

    def sparsity_norms(self) -> torch.Tensor:
        """``[2, F]`` the decoder norms as the L1 penalty weighs them, ``w_j ||d_j^m||``: ``w_j = shared_l1_ratio``
        on the tied latents of a shared crosscoder, 1 elsewhere (so the one penalty formula,
        :func:`~crossdiff_core.crosscoder_formulas.l1_penalty`, serves every L1-family kind)."""
        norms = self.decoder_norms()
        if self.cfg.kind != "shared":
            return norms
        t = _sl(self.cfg.partition()["tied"])
        return torch.cat([norms[:, t] * self.cfg.shared_l1_ratio, norms[:, t.stop:]], dim=1)

    def pre_activations(self, xn: torch.Tensor) -> torch.Tensor:
        """``[batch, 2, d]`` normalised -> ``[batch, F]`` pre-activations ``W_encᵀ x + b_enc``."""
        d, F = self.cfg.d_model, self.cfg.dict_size
        return torch.addmm(self.b_enc, xn.reshape(-1, 2 * d), self.W_enc.reshape(2 * d, F))

    def scores(self, pre: torch.Tensor) -> torch.Tensor:
        """BatchTopK selection scores ``v_j = relu(pre_j) (||d_j^b|| + ||d_j^c||)``, ``[batch, F]``."""
        with torch.no_grad():
            return pre.detach().clamp_min(0).mul_(self.decoder_norms().sum(0).to(pre.dtype))

    def batch_mask(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK selection: ``[batch, F]`` bool mask of the ``k·batch`` largest scores over the whole
        batch (ReLU zeros never count), and the smallest kept score ``v`` (for the inference threshold)."""
        v = self.scores(pre)
        thr = self.batch_reduce.kth_largest(v, self.cfg.k)
        # a positive threshold already leaves out the ReLU zeros: one pass instead of three
        return (v >= thr) if bool(thr > 0) else (v >= thr) & (v > 0), thr

    def batch_entries(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch_mask`'s selection as entries: ``(rows, latents) [nnz]`` sorted by row, and the smallest kept score ``v``."""
        v = self.scores(pre)
        idx, thr = self.batch_reduce.top_entries(v, self.cfg.k)
        if not bool(thr > 0):  # fewer positive scores than k·batch: the ReLU zeros never count
            idx = idx[v.reshape(-1)[idx] > 0]
        F = self.cfg.dict_size
        return idx // F, idx % F, thr

    def _select_batch(self, pre: torch.Tensor) -> Codes:
        rows, lat, _ = self.batch_entries(pre)
        return Codes(Fn.relu(pre[rows, lat]), rows, lat, pre.shape[0])

    @torch.no_grad()
    def update_threshold(self, min_kept_score: torch.Tensor, decay: float) -> None:
        """One EMA step of the inference threshold ``θ ← decay·θ + (1 − decay)·v`` towards a training batch's
        smallest kept score ``v`` (the first step sets ``θ = v``)."""
        v = min_kept_score.float()
        thr = self.threshold
        thr.copy_(v if not torch.isfinite(thr) else decay * thr + (1 - decay) * v)

    def _select_threshold(self, pre: torch.Tensor) -> Codes:
        if not torch.isfinite(self.threshold):
            raise CrossdiffError(
                "this batchtopk crosscoder has no inference threshold yet (train it past warm-up, or call "
                "encode(..., batch_topk=True))"
            )
        v = self.scores(pre)
        rows, lat = (v > self.threshold).nonzero(as_tuple=True)
        return Codes(Fn.relu(pre[rows, lat]), rows, lat, pre.shape[0])

    def encode_sparse(self, x: torch.Tensor, *, batch_topk: bool | None = None, normalised: bool = False) -> Codes:
        """Codes of ``x [batch, 2, d]``. BatchTopK (and dfc) uses the batch selection when ``batch_topk``
        (default: in training mode) and the inference threshold otherwise; L1 (and shared) keeps every
        positive ``relu(pre)``."""
        xn = x if normalised else self.normalise(x)
        pre = self.pre_activations(xn)
        if self.cfg.sparsity == "l1":
            f = Fn.relu(pre)
            rows, lat = f.nonzero(as_tuple=True)
            return Codes(f[rows, lat], rows, lat, f.shape[0])
        if batch_topk is None:
            batch_topk = self.training
        return self._select_batch(pre) if batch_topk else self._select_threshold(pre)

    def encode(self, x: torch.Tensor, *, batch_topk: bool | None = None, normalised: bool = False) -> torch.Tensor:
        """``[batch, 2, d]`` model units (or already normalised, with ``normalised``) -> dense codes ``f [batch, F]``."""
        xn = x if normalised else self.normalise(x)
        if self.cfg.sparsity == "l1":
            return Fn.relu(self.pre_activations(xn))
        return self.encode_sparse(xn, batch_topk=batch_topk, normalised=True).to_dense(self.cfg.dict_size)

    def decode_normalised(self, f: torch.Tensor | Codes) -> torch.Tensor:
        """Codes (dense ``[batch, F]`` or sparse) -> ``x̂ [batch, 2, d]`` in normalised units."""
        if isinstance(f, Codes):
            return sparse_decode(f, self.W_dec, self.b_dec)
        B, F, d = f.shape[0], self.cfg.dict_size, self.cfg.d_model
        # one [B,F]x[F,2d] product; the [F,2d] copy of W_dec is cheap next to it
        w = self.W_dec.transpose(0, 1).reshape(F, 2 * d)
        return (f.to(w.dtype) @ w).view(B, 2, d) + self.b_dec

    def decode(self, f: torch.Tensor | Codes) -> torch.Tensor:
        """Codes -> reconstruction ``x̂ [batch, 2, d]`` in the models' own units."""
        return self.denormalise(self.decode_normalised(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x [batch, 2, d]`` (model units) -> ``x̂ [batch, 2, d]`` (model units)."""
        return self.decode(self.encode_sparse(x))

    # ---- training objective ------------------------------------------------------------------
    def loss(self, x: torch.Tensor, *, l1_coeff: float | None = None, dead: torch.Tensor | None = None,
             products: str | None = None) -> LossOutput:
        """The DESIGN §1 objective on one batch ``x [batch, 2, d]`` (model units).

        L1 family: ``Σ_m ||x_m − x̂_m||² + λ Σ_j w_j f_j (||d_j^b|| + ||d_j^c||)`` (``w_j`` = shared_l1_ratio on a
        shared crosscoder's tied latents, else 1: :meth:`sparsity_norms`); BatchTopK family: ``Σ_m ||x_m − x̂_m||² + α L_aux``
        with ``L_aux`` over the ``dead [F]`` latents (bool mask) when any are dead. ``products``: ``"dense"`` or
        ``"sparse"`` products (:mod:`crossdiff_core.sparse_step`; the same results to float round-off), or
        chosen by the codes' density (``None``/``"auto"``, :func:`~crossdiff_core.sparse_step.use_sparse`).
        """
        xn = self.normalise(x)
        B, F, d = xn.shape[0], self.cfg.dict_size, self.cfg.d_model
        nan = torch.tensor(float("nan"), device=xn.device)
        zero = xn.new_zeros(())
        # BatchTopK keeps k·B entries (ties aside): the density is known before the product, whose
        # autograd graph the sparse step does not need
        if self.cfg.sparsity == "batchtopk" and use_sparse(products, self.cfg.k * B, B, F, d):
            with torch.no_grad():
                pre = self.pre_activations(xn)
            rows, lat, thr = self.batch_entries(pre)
            return self._loss_sparse(xn, pre, rows, lat, lam=None, dead=dead, thr=thr)
        pre = self.pre_activations(xn)
        if self.cfg.sparsity == "l1":
            lam = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
            # counting the active codes is a pass over [B, F]: only when the density decides
            nnz = int((pre.detach() > 0).sum()) if products in (None, "auto") else 0
            if use_sparse(products, nnz, B, F, d):
                rows, lat = (pre.detach() > 0).nonzero(as_tuple=True)
                return self._loss_sparse(xn, pre, rows, lat, lam=lam, dead=None, thr=nan)
            f = Fn.relu(pre)
            x_hat = self.decode_normalised(f)
            recon = reconstruction_loss(xn, x_hat)
            sparsity = l1_penalty(f, self.sparsity_norms(), lam)
            counts = firing_counts(f)
            return LossOutput(recon + sparsity, recon, sparsity, zero, counts.sum() / B, counts > 0,
                              x_hat.detach(), nan)
        mask, thr = self.batch_mask(pre)
        f = torch.where(mask, pre, 0.0)  # kept entries are positive, so this is relu(pre) on them
        x_hat = self.decode_normalised(f)
        recon = reconstruction_loss(xn, x_hat)
        aux = zero
        if dead is not None and bool(dead.any()):
            aux = self.aux_loss(xn, x_hat.detach(), dead)
        counts = firing_counts(f)
        return LossOutput(recon + self.cfg.aux_alpha * aux, recon, zero, aux, counts.sum() / B, counts > 0,
                          x_hat.detach(), thr)

    def _loss_sparse(self, xn: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, lat: torch.Tensor, *,
                     lam: float | None, dead: torch.Tensor | None, thr: torch.Tensor) -> LossOutput:
        """:meth:`loss` through the sparse step's products, for the active entries ``(rows, lat) [nnz]``
        (sorted by row) of ``pre [B, F]``; ``lam`` is L1's λ (None: BatchTopK)."""
        B, F, d = xn.shape[0], self.cfg.dict_size, self.cfg.d_model
        has_dead = dead is not None and bool(dead.any())
        dead_idx = dead.nonzero(as_tuple=True)[0] if has_dead else None
        f, x_hat, pre_dead, dec_dead = sparse_codes_step(self.W_enc, self.b_enc, self.W_dec, xn.reshape(B, 2 * d),
                                                         pre, rows, lat, dead_idx)
        x_hat = x_hat + self.b_dec
        recon = reconstruction_loss(xn, x_hat)
        zero = xn.new_zeros(())
        sparsity = aux = zero
        if lam is not None:
            sparsity = l1_penalty(Codes(f, rows, lat, B), self.sparsity_norms(), lam)
        if has_dead:
            aux = self.aux_loss(xn, x_hat.detach(), dead, pre_dead=pre_dead, dec_dead=dec_dead)
        loss = recon + sparsity if lam is not None else recon + self.cfg.aux_alpha * aux
        counts = torch.bincount(lat, minlength=F).to(torch.float32)
        return LossOutput(loss, recon, sparsity, aux, counts.sum() / B, counts > 0, x_hat.detach(), thr)

    def aux_loss(self, xn: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor,
                 pre_dead: torch.Tensor | None = None, dec_dead: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the ``aux_k`` largest pre-activations among ``dead`` latents reconstruct
        the detached error ``e = x − x̂``; ``L_aux = Σ_m ||e_m − ê_m||² / Σ_m ||e_m − mean(e_m)||²``.

        A dead latent's pre-activation is negative on almost every token, so a plain ReLU would pass no
        gradient. The codes use ``relu`` in the forward pass but a straight-through gradient (identity)
        to the pre-activation, so the encoder learns to raise dead latents where their decoder row
        points along the error; once one fires, the main loss takes over. ``pre_dead [B, n_dead]`` and
        ``dec_dead [n_dead, 2d]``: the dead latents' pre-activations and decoder rows where the caller has
        them (the sparse step, whose backward adds their gradients in its own pass), else their own product.
        """
        e = (xn - x_hat).detach()  # [B, 2, d]
        # work on the dead columns only: cheap when few latents are dead, which is the common case; their
        # own small encoder product keeps the gradient off the [B, F] pre-activations
        idx = dead.nonzero(as_tuple=True)[0]
        d = self.cfg.d_model
        # (the dead latents' encoder rows, gathered where they are contiguous: W_enc_rows)
        pre_d = pre_dead if pre_dead is not None else torch.addmm(
            self.b_enc[idx], xn.reshape(-1, 2 * d), self.W_enc_rows[idx].reshape(-1, 2 * d).t())
        if self.cfg.aux_k >= idx.numel():  # every dead latent is among the aux_k largest: no selection
            f_aux = pre_d + (Fn.relu(pre_d) - pre_d).detach()  # forward relu, backward identity
        else:
            vals, pos = pre_d.topk(self.cfg.aux_k, dim=1, sorted=False)
            f_aux = torch.zeros_like(pre_d).scatter(1, pos, vals + (Fn.relu(vals) - vals).detach())
        w = dec_dead if dec_dead is not None else self.W_dec[:, idx].transpose(0, 1).reshape(idx.numel(), -1)
        e_hat = (f_aux @ w).view_as(e)
        denom = self.batch_reduce.aux_denominator(e).clamp_min(1e-12)
        return (e - e_hat).pow(2).sum() / denom

    # ---- save / load -------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (DESIGN §2) atomically into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "W_enc": self.W_enc.detach().contiguous().cpu(),
            "b_enc": self.b_enc.detach().contiguous().cpu(),
            "W_dec": self.W_dec.detach().contiguous().cpu(),
            "b_dec": self.b_dec.detach().contiguous().cpu(),
            "scales": self.scales.detach().contiguous().cpu(),
        }
        if self.cfg.sparsity == "batchtopk":
            tensors["threshold"] = self.threshold.detach().reshape(()).contiguous().cpu()
        atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p)))
        self.weights_sha256 = file_sha256(out / "model.safetensors")  # what later stages record (runs.py)
        self.source = str(out)
        cfg = asdict(self.cfg)
        cfg["dtype"] = str(self.W_enc.dtype).removeprefix("torch.")
        atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> "CrossCoder":
        """Load a crosscoder directory written by :meth:`save` (or any tool writing DESIGN §2's format).

        Refused with a :class:`CrossdiffError` naming the file: a config.json that does not parse, lacks a
        required key or holds NaN/inf; a model.safetensors that is not a safetensors file (garbage,
        truncated), lacks a tensor or has the wrong shape or dtype; a NaN/inf weight (named); a shared or dfc
        crosscoder whose weights break its tie or its zeros (:meth:`constraint_violations`). Sets
        ``weights_sha256``, the sha256 of model.safetensors, which identifies the crosscoder downstream."""
        p = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (p / name).is_file():
                raise CrossdiffError(f"{p} is not a crosscoder directory: {name} is missing (train one with `crossdiff train`)")
        cfg = CrossCoderConfig.from_dict(read_config_json(p / "config.json"), source=str(p / "config.json"))
        st = p / "model.safetensors"
        try:
            sd = load_file(str(st), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CrossdiffError(f"{st} is not a readable safetensors file ({exc}): it is truncated or corrupt; "
                                 "retrain, or restore it") from None
        expect = {"W_enc": (2, cfg.d_model, cfg.dict_size), "b_enc": (cfg.dict_size,),
                  "W_dec": (2, cfg.dict_size, cfg.d_model), "b_dec": (2, cfg.d_model), "scales": (2,)}
        for k, shape in expect.items():
            if k not in sd or tuple(sd[k].shape) != shape:
                got = tuple(sd[k].shape) if k in sd else "missing"
                raise CrossdiffError(f"{st}: tensor {k} should be {shape}, is {got}; the file does not match config.json")
        if "threshold" in sd and sd["threshold"].numel() != 1:
            raise CrossdiffError(f"{st}: tensor threshold should be a scalar, is {tuple(sd['threshold'].shape)}")
        names = list(expect) + (["threshold"] if "threshold" in sd else [])
        for k in names:
            if not sd[k].is_floating_point():
                raise CrossdiffError(f"{st}: tensor {k} is {sd[k].dtype}, not floating point; the file is not a crosscoder")
        # every weight must be finite; an untrained BatchTopK threshold is NaN by design (analyze refuses it)
        bad = [k for k in expect if not bool(torch.isfinite(sd[k]).all())]
        if "threshold" in sd and bool(torch.isinf(sd["threshold"]).any()):
            bad.append("threshold")
        if bad:
            counts = ", ".join(f"{k} ({int((~torch.isfinite(sd[k])).sum())} values)" for k in bad)
            raise CrossdiffError(f"{st} holds NaN or inf weights: {counts}; this crosscoder cannot be used. Retrain it "
                                 "(training stops at a NaN loss and keeps the last good checkpoint)")
        model = cls(cfg, scales=sd["scales"], device=device, dtype=sd["W_enc"].dtype, seed=None)
        broken = model.constraint_violations(sd["W_enc"], sd["W_dec"])
        if broken:
            raise CrossdiffError(f"{st} breaks the {cfg.kind} crosscoder's partition ({'; '.join(broken)}; layout: "
                                 f"CrossCoderConfig.partition): the tool that wrote it did not keep the constraints. "
                                 f"Retrain it with `crossdiff train --kind {cfg.kind}`, or fix the weights")
        with torch.no_grad():
            for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(model, k).copy_(sd[k])
            if "threshold" in sd:
                model.threshold.copy_(sd["threshold"].reshape(()))
        model.weights_sha256 = file_sha256(st)
        model.source = str(p)  # where it was loaded from, for messages
        return model

    def nonfinite_weights(self) -> list[str]:
        """Names of the weights holding NaN or inf (the BatchTopK threshold only when inf: NaN is "not set")."""
        bad = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec", "scales")
               if not bool(torch.isfinite(getattr(self, k)).all())]
        return bad + (["threshold"] if bool(torch.isinf(self.threshold).any()) else [])


def _sl(r: range) -> slice:
    """The slice of a contiguous block of latents."""
    return slice(r.start, r.stop)
