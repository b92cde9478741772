"""Latent Scaling against brute force: β from a per-latent torch.linalg.lstsq on explicitly built targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.decoder_norms import CLASSES, class_codes, delta_norm
from crossdiff_core.errors import ConfigError
from crossdiff_core.latent_scaling import (TARGETS, LatentScaling, compute_nu, data_driven_filter,
                                           direction_models, fixed_filter, nu, nu_rank, shared_interval)

D, F, N = 12, 24, 400
DEAD = 5  # a latent that never fires


def _model(kind: str, seed: int = 0) -> CrossCoder:
    cfg = CrossCoderConfig(kind=kind, d_model=D, dict_size=F, k=4 if kind == "batchtopk" else None)
    m = CrossCoder(cfg, scales=torch.tensor([1.7, 0.6]), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.W_dec.copy_(torch.randn(2, F, D, generator=g))
        m.W_dec[1, :4] *= 0.02  # base-only latents
        m.W_dec[0, 4:8] *= 0.02  # chat-only latents
        m.W_enc.copy_(torch.randn(2, D, F, generator=g) * 0.5)
        m.b_enc.copy_(torch.randn(F, generator=g) * 0.5 - 0.3)
        m.b_enc[DEAD] = -1e4
        m.b_dec.copy_(torch.randn(2, D, generator=g))
        if kind == "batchtopk":
            m.threshold.fill_(0.5)
    return m.eval()


def _data(seed: int = 0, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 2, D, generator=g) * torch.tensor([1.7, 0.6])[None, :, None]


def _brute_betas(model: CrossCoder, x: torch.Tensor, dir_model: torch.Tensor) -> dict[str, torch.Tensor]:
    """β per latent and target from torch.linalg.lstsq of y (flattened [N*d]) on f_j(n)·D_j, float64."""
    W = model.W_dec.detach().double()
    xn = (x.double() / model.scales.double()[None, :, None])
    f = model.encode(x).detach().double()  # [N, F]
    x_hat = torch.stack([f @ W[m] + model.b_dec[m].detach().double() for m in range(2)], dim=1)
    out = {t: torch.full((F,), float("nan"), dtype=torch.float64) for t in TARGETS}
    for j in range(F):
        if not bool((f[:, j] != 0).any()):
            continue
        Dj = W[int(dir_model[j]), j]
        A = (f[:, j, None] * Dj[None, :]).reshape(-1, 1)
        for m, name in enumerate(("base", "chat")):
            y_err = (xn[:, m] - x_hat[:, m]) + f[:, j, None] * W[m, j][None, :]
            y_rec = x_hat[:, m]
            out[f"error_{name}"][j] = torch.linalg.lstsq(A, y_err.reshape(-1, 1)).solution.item()
            out[f"recon_{name}"][j] = torch.linalg.lstsq(A, y_rec.reshape(-1, 1)).solution.item()
    return out


def _run(model: CrossCoder, x: torch.Tensor, dir_model: torch.Tensor, *, mode: str = "auto",
         batch: int = N, order=None) -> LatentScaling:
    ls = LatentScaling(model.W_dec, dir_model, mode=mode)
    starts = list(range(0, x.shape[0], batch))
    for a in (order(starts) if order else starts):
        with torch.no_grad():
            xn = model.normalise(x[a:a + batch])
            codes = model.encode_sparse(xn, normalised=True)
            ls.update(codes, xn, model.decode_normalised(codes))
    return ls


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
@pytest.mark.parametrize("direction", ["chat", "base", "auto"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_beta_matches_brute_force_lstsq(kind, direction, mode):
    model = _model(kind)
    x = _data()
    cls = class_codes(delta_norm(*model.decoder_norms().detach()))
    assert (cls[:4] == CLASSES.index("base_only")).all() and (cls[4:8] == CLASSES.index("chat_only")).all()
    dm = direction_models(cls, direction)
    got = _run(model, x, dm, mode=mode, batch=97).betas()
    want = _brute_betas(model, x, dm)
    for t in TARGETS:
        assert math.isnan(got[t][DEAD]) and math.isnan(want[t][DEAD]), t
        fired = ~torch.isnan(want[t])
        assert int(fired.sum()) >= F - 3  # the test exercises nearly every latent
        torch.testing.assert_close(got[t][fired], want[t][fired], rtol=1e-4, atol=1e-7, msg=t)


def test_direction_choice_changes_the_row_used():
    model = _model("l1")
    cls = class_codes(delta_norm(*model.decoder_norms().detach()))
    assert direction_models(cls, "chat").tolist() == [1] * F
    assert direction_models(cls, "base").tolist() == [0] * F
    assert direction_models(cls, "auto").tolist() == [0] * 4 + [1] * (F - 4)  # base row only for base-only
    with pytest.raises(ConfigError, match="direction"):
        direction_models(cls, "both")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_streaming_independent_of_batch_size_and_order(mode):
    model = _model("batchtopk")
    x = _data(n=600)
    dm = direction_models(class_codes(delta_norm(*model.decoder_norms().detach())), "auto")
    one = _run(model, x, dm, mode=mode, batch=600)
    rng = np.random.default_rng(0)
    shuffled = _run(model, x, dm, mode=mode, batch=37, order=lambda s: list(rng.permutation(s)))
    # two "shards" accumulated separately, merged in reverse order
    a = _run(model, x[:250], dm, mode=mode, batch=64)
    b = _run(model, x[250:], dm, mode=mode, batch=64)
    merged = b.merge(a)
    for other in (shuffled, merged):
        assert other.n_tokens == one.n_tokens == 600
        for t in TARGETS:
            # per-batch products are float32, the sums across batches float64: equal to float32 round-off
            torch.testing.assert_close(other.betas()[t], one.betas()[t], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_dense_codes_and_sparse_codes_agree():
    model = _model("l1")
    x = _data()
    dm = torch.ones(F, dtype=torch.int64)
    with torch.no_grad():
        xn = model.normalise(x)
        f = model.encode(x)
        xh = model.decode_normalised(f)
    dense_in = LatentScaling(model.W_dec, dm, mode="sparse")
    dense_in.update(f, xn, xh)  # a dense [N, F] tensor is accepted and converted
    ref = _run(model, x, dm, mode="dense")
    for t in TARGETS:
        torch.testing.assert_close(dense_in.betas()[t], ref.betas()[t], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_planted_beta_is_recovered_exactly():
    # y_n = 0.3 f(n) D exactly in the base reconstruction and 1.0 f(n) D in the chat one -> β 0.3 and 1
    Wd = torch.zeros(2, 2, 3)
    Wd[1, 0] = torch.tensor([0.0, 2.0, 0.0])
    Wd[0, 1] = torch.tensor([1.0, 0.0, 0.0])
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    d0 = Wd[1, 0]
    x_hat = torch.stack([0.3 * f[:, :1] * d0, f[:, :1] * d0], dim=1)
    xn = x_hat + torch.stack([0.5 * f[:, :1] * d0, torch.zeros(3, 3)], dim=1)  # base error carries 0.5 D
    ls = LatentScaling(Wd, torch.tensor([1, 0]))
    ls.update(f, xn, x_hat)
    b = ls.betas()
    assert b["recon_base"][0].item() == pytest.approx(0.3)
    assert b["recon_chat"][0].item() == pytest.approx(1.0)
    # error base: 0.5 from the error + (d^b·d^c)/||d^c||² = 0 own term; error chat: 0 + 1 (own term)
    assert b["error_base"][0].item() == pytest.approx(0.5)
    assert b["error_chat"][0].item() == pytest.approx(1.0)
    assert all(math.isnan(b[t][1]) for t in TARGETS)  # latent 1 never fires -> NaN, no crash


def test_nu_rank_and_fixed_filter_hand_computed():
    be = torch.tensor([0.1, 0.9, 0.05, float("nan"), 0.3, 2.0], dtype=torch.float64)
    ce = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
    n = nu(be, ce)
    assert n[:3].tolist() == pytest.approx([0.1, 0.9, 0.1])
    assert math.isnan(n[3]) and math.isnan(n[4])  # NaN β, and β^c = 0
    ne = torch.tensor([0.1, 0.9, 0.1, 0.5, float("nan"), -0.2], dtype=torch.float64)
    nr = torch.tensor([0.2, 0.1, 0.6, 0.4, 0.3, 0.7], dtype=torch.float64)
    # ranks among finite (0,1,2,3,5): ν_ε order 5,0,2,3,1 (tie 0/2 by index) -> 5:1 0:2 2:3 3:4 1:5
    #                                 ν_r order 1,0,3,2,5                    -> 1:1 0:2 3:3 2:4 5:5
    r = nu_rank(ne, nr)
    assert r[[0, 1, 2, 3, 5]].tolist() == [4.0, 6.0, 7.0, 7.0, 6.0]
    assert math.isnan(r[4])
    # within groups: {0, 1, 2} and {3, 5}
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    rg = nu_rank(ne, nr, g)
    assert rg[[0, 1, 2, 3, 5]].tolist() == [3.0, 4.0, 5.0, 3.0, 3.0]
    assert fixed_filter(ne, nr).tolist() == [True, False, False, False, False, False]
    assert fixed_filter(ne, nr, nu_error_max=1.0, nu_recon_max=0.65).tolist() == [True, True, True, True, False, False]


def test_shared_interval_and_data_driven_cut():
    rng = np.random.default_rng(0)
    shared_ne = rng.uniform(0.6, 1.4, 200)
    shared_nr = rng.uniform(0.7, 1.2, 200)
    co_ne = np.array([0.05, 0.9, 0.05, 0.05])
    co_nr = np.array([0.1, 0.1, 0.95, np.nan])
    ne = torch.from_numpy(np.concatenate([shared_ne, co_ne]))
    nr = torch.from_numpy(np.concatenate([shared_nr, co_nr]))
    cls = torch.tensor([CLASSES.index("shared")] * 200 + [CLASSES.index("chat_only")] * 4)
    lo, hi = shared_interval(ne, cls == CLASSES.index("shared"))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(shared_ne, [2.5, 97.5])))
    cut = data_driven_filter(ne, nr, cls)
    assert cut.n_shared == 200
    assert cut.nu_recon_interval == pytest.approx(tuple(np.percentile(shared_nr, [2.5, 97.5])))
    assert cut.passed[200:].tolist() == [True, False, False, False]
    lo_e, lo_r = np.percentile(shared_ne, 2.5), np.percentile(shared_nr, 2.5)
    assert cut.passed[:200].numpy().tolist() == ((shared_ne < lo_e) & (shared_nr < lo_r)).tolist()
    # a rarely-firing shared latent with a wild ν, left out of the reference set, leaves the cut unchanged
    wild = torch.tensor([-50.0], dtype=torch.float64)
    ne2, nr2 = torch.cat([ne, wild]), torch.cat([nr, wild])
    cls2 = torch.cat([cls, torch.tensor([CLASSES.index("shared")])])
    ref = torch.ones(205, dtype=torch.bool)
    ref[-1] = False
    with_outlier = data_driven_filter(ne2, nr2, cls2)
    assert with_outlier.n_shared == 201 and with_outlier.nu_error_interval[0] < lo_e
    kept_out = data_driven_filter(ne2, nr2, cls2, reference=ref)
    assert kept_out.n_shared == 200 and kept_out.nu_error_interval == cut.nu_error_interval
    assert kept_out.passed[:204].tolist() == cut.passed.tolist()
    none = data_driven_filter(ne[200:], nr[200:], cls[200:])  # no shared latents: nothing passes
    assert math.isnan(none.nu_error_interval[0]) and not bool(none.passed.any())


def test_compute_nu_ranks_within_class():
    betas = {"error_base": torch.tensor([0.5, 0.1, 0.2]), "error_chat": torch.ones(3),
             "recon_base": torch.tensor([0.5, 0.3, 0.1]), "recon_chat": torch.ones(3)}
    res = compute_nu(betas, torch.tensor([0, 0, 2]))
    assert res.nu_rank.tolist() == [4.0, 2.0, 2.0]


def test_bad_shapes_raise():
    with pytest.raises(ConfigError, match="W_dec"):
        LatentScaling(torch.zeros(3, 4, 5), torch.zeros(4, dtype=torch.int64))
    ls = LatentScaling(torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ConfigError, match="xn and x_hat"):
        ls.update(torch.zeros(3, 4), torch.zeros(3, 2, 6), torch.zeros(3, 2, 6))
