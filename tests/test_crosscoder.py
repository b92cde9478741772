"""CrossCoder maths checked against hand computations (numpy / explicit loops on tiny sizes)."""

import json

import numpy as np
import pytest
import torch

from crossdiff_core.crosscoder import (CrossCoder, CrossCoderConfig, batch_kth_largest, sparse_decode, Codes)
from crossdiff_core.crosscoder_formulas import batch_top_entries
from crossdiff_core.errors import ConfigError, CrossdiffError
from tests.conftest import grad_of


def _random_model(kind, d=6, F=10, k=3, l1=0.3, scales=(2.0, 0.5), seed=0):
    cfg = CrossCoderConfig(kind=kind, d_model=d, dict_size=F, k=k, l1_coeff=l1)
    m = CrossCoder(cfg, scales=torch.tensor(scales), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _np_forward(m, x):
    """Per-token loops in numpy: normalise, encode, decode (independent of the vectorised code)."""
    W_enc, b_enc = m.W_enc.detach().double().numpy(), m.b_enc.detach().double().numpy()
    W_dec, b_dec = m.W_dec.detach().double().numpy(), m.b_dec.detach().double().numpy()
    s = m.scales.double().numpy()
    x = x.double().numpy()
    B, _, d = x.shape
    F = b_enc.shape[0]
    xn = x / s[None, :, None]
    pre = np.zeros((B, F))
    for n in range(B):
        for j in range(F):
            pre[n, j] = xn[n, 0] @ W_enc[0, :, j] + xn[n, 1] @ W_enc[1, :, j] + b_enc[j]
    return xn, pre, W_dec, b_dec


def test_l1_loss_matches_hand_computation():
    m = _random_model("l1")
    x = torch.randn(5, 2, 6) * torch.tensor([2.0, 0.5])[None, :, None]
    xn, pre, W_dec, b_dec = _np_forward(m, x)
    f = np.maximum(pre, 0)
    total = 0.0
    for n in range(5):
        for mm in range(2):
            xh = f[n] @ W_dec[mm] + b_dec[mm]
            total += np.sum((xn[n, mm] - xh) ** 2)
        for j in range(10):
            total += 0.3 * f[n, j] * (np.linalg.norm(W_dec[0, j]) + np.linalg.norm(W_dec[1, j]))
    out = m.loss(x)
    assert out.loss.item() == pytest.approx(total / 5, rel=1e-5)
    assert out.l0.item() == pytest.approx((f > 0).sum() / 5)
    np.testing.assert_array_equal(out.fired.numpy(), (f > 0).any(0))
    # public API works in model units: x̂_m = s_m (f W_dec[m] + b_dec[m])
    x_hat = m(x).detach().double().numpy()
    ref = np.stack([f @ W_dec[mm] + b_dec[mm] for mm in range(2)], 1) * m.scales.double().numpy()[None, :, None]
    np.testing.assert_allclose(x_hat, ref, rtol=1e-5, atol=1e-5)


def test_batchtopk_keeps_exactly_kB_and_threshold_path_matches():
    torch.manual_seed(0)
    d, F, k, B = 8, 64, 4, 32
    m = _random_model("batchtopk", d=d, F=F, k=k)
    x = torch.randn(B, 2, d)
    xn, pre, W_dec, _ = _np_forward(m, x)
    v = np.maximum(pre, 0) * (np.linalg.norm(W_dec[0], axis=1) + np.linalg.norm(W_dec[1], axis=1))[None]
    assert (v > 0).sum() > k * B  # enough candidates for the test to mean something
    order = np.sort(v.reshape(-1))[::-1]
    expect_mask = v >= order[k * B - 1]
    f = m.encode(x, batch_topk=True).detach().numpy()
    assert (f != 0).sum() == k * B
    np.testing.assert_array_equal(f != 0, expect_mask)
    np.testing.assert_allclose(f[expect_mask], np.maximum(pre, 0)[expect_mask], rtol=1e-5)
    out = m.loss(x)
    assert out.l0.item() == k
    np.testing.assert_array_equal(out.fired.numpy(), expect_mask.any(0))
    # the inference threshold between the kB-th and (kB+1)-th score reproduces the batch selection
    with torch.no_grad():
        m.threshold.fill_(float((order[k * B - 1] + order[k * B]) / 2))
    m.eval()
    f_thr = m.encode(x).detach().numpy()
    np.testing.assert_array_equal(f_thr, f)
    # and one token's code no longer depends on its batch
    one = m.encode(x[:1]).detach().numpy()
    np.testing.assert_array_equal(one != 0, f[:1] != 0)
    np.testing.assert_allclose(one, f[:1], rtol=1e-5)


def test_batchtopk_without_threshold_is_a_clear_error():
    m = _random_model("batchtopk")
    m.eval()
    with pytest.raises(CrossdiffError, match="threshold"):
        m.encode(torch.randn(3, 2, 6))


def test_batch_kth_largest_exact():
    g = torch.Generator().manual_seed(3)
    for n, k in [(10, 3), (1 << 18, 500), (1 << 18, 1 << 17), (300000, 7)]:
        v = torch.relu(torch.randn(n, generator=g))
        assert batch_kth_largest(v, k).item() == torch.sort(v, descending=True).values[k - 1].item()


def test_batch_top_entries_are_every_entry_at_or_above_the_kth():
    g = torch.Generator().manual_seed(4)
    for n, k in [(10, 3), (10, 10), (1 << 18, 500), (1 << 18, 1 << 17), (300000, 7)]:
        v = torch.relu(torch.randn(n, generator=g))
        v[:50] = 1.5  # a block of ties
        want = torch.sort(v, descending=True).values[k - 1]
        idx, t = batch_top_entries(v, k)
        assert t.item() == want.item()
        assert torch.equal(idx, torch.nonzero(v >= want).squeeze(1))  # sorted, ties included


@pytest.mark.parametrize("positive", [0.5, 0.001])  # plenty of positive scores; fewer than k·batch
def test_batch_entries_match_the_batch_mask(positive):
    cfg = CrossCoderConfig(kind="batchtopk", d_model=8, dict_size=4096, k=16)
    m = CrossCoder(cfg, seed=0)
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(64, 4096, generator=g)
    pre = torch.where(torch.rand(64, 4096, generator=g) < positive, pre.abs(), -pre.abs())
    mask, thr = m.batch_mask(pre)
    rows, lat, t = m.batch_entries(pre)
    want_rows, want_lat = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(lat, want_lat)
    assert t.item() == thr.item()
    assert rows.numel() == (64 * 16 if positive == 0.5 else int((pre > 0).sum()))


def test_sparse_decode_matches_dense():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 20, 5, generator=g)
    b = torch.randn(2, 5, generator=g)
    f = torch.relu(torch.randn(7, 20, generator=g) - 1.0)
    f[3] = 0  # a token with no active latents
    rows, lat = f.nonzero(as_tuple=True)
    out = sparse_decode(Codes(f[rows, lat], rows, lat, 7), W, b)
    ref = torch.stack([f @ W[0] + b[0], f @ W[1] + b[1]], 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auxk_value_and_gradients_reach_only_dead_latents():
    torch.manual_seed(0)
    d, F, B = 6, 12, 16
    m = _random_model("batchtopk", d=d, F=F, k=2)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 4, 7, 9]] = True
    with torch.no_grad():  # dead latents: negative pre-activation on every token, as after training
        m.b_enc[dead] = -50.0
    x = torch.randn(B, 2, d)
    xn = m.normalise(x)
    pre = m.pre_activations(xn)
    assert (pre[:, dead] < 0).all()
    x_hat = m.decode_normalised(m.encode_sparse(xn, batch_topk=True, normalised=True)).detach()
    aux = m.aux_loss(xn, x_hat, dead)
    # value: with all dead pre-activations negative, ê = 0, so L_aux = Σ||e||² / Σ||e − mean e||²
    e = (xn - x_hat).detach().double()
    ref = e.pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert aux.item() == pytest.approx(ref.item(), rel=1e-5)
    aux.backward()
    g_enc = grad_of(m, "W_enc").abs().sum(dim=(0, 1))
    assert (g_enc[~dead] == 0).all() and (m.b_enc.grad[~dead] == 0).all()
    assert (g_enc[dead] > 0).all(), "AuxK must move dead latents' encoders even when their pre-activations are negative"
    assert (m.W_dec.grad[:, ~dead] == 0).all()


def test_auxk_revives_dead_latents():
    """A few Adam steps on α·L_aux raise the dead latents' pre-activations along the error."""
    torch.manual_seed(0)
    d, F, B = 8, 16, 256
    m = _random_model("batchtopk", d=d, F=F, k=2)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[8:] = True
    x = torch.randn(B, 2, d)
    with torch.no_grad():  # just below firing on every token
        m.b_enc[dead] -= m.pre_activations(m.normalise(x))[:, dead].max(0).values + 0.5
    opt = torch.optim.Adam([m.W_enc_rows, m.b_enc], lr=0.05)
    before = m.pre_activations(m.normalise(x))[:, dead].max().item()
    for _ in range(60):
        xn = m.normalise(x)
        pre = m.pre_activations(xn)
        x_hat = m.decode_normalised(m.encode_sparse(xn, batch_topk=True, normalised=True)).detach()
        opt.zero_grad()
        m.aux_loss(xn, x_hat, dead).backward()
        opt.step()
    after = m.pre_activations(m.normalise(x))[:, dead]
    assert before < 0 and (after > 0).any(dim=0).float().mean() > 0.5


def test_save_load_roundtrip_bit_exact(tmp_path):
    for kind in ("l1", "batchtopk"):
        m = _random_model(kind)
        with torch.no_grad():
            m.threshold.fill_(0.123456789)
        m.cfg.cache_manifest_hash = "ab" * 32
        m.save(tmp_path / kind)
        r = CrossCoder.load(tmp_path / kind)
        for name, t in m.state_dict().items():
            if kind == "l1" and name == "threshold":
                continue
            assert torch.equal(t, r.state_dict()[name]), name
        cfg = json.loads((tmp_path / kind / "config.json").read_text())
        assert cfg["kind"] == kind and cfg["d_model"] == 6 and cfg["dict_size"] == 10
        assert cfg["cache_manifest_hash"] == "ab" * 32
        assert not list((tmp_path / kind).glob("*.tmp"))


def test_bad_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="k=20 is larger than the dictionary"):
        CrossCoderConfig(kind="batchtopk", d_model=4, dict_size=10, k=20)
    with pytest.raises(ConfigError, match="needs k"):
        CrossCoderConfig(kind="batchtopk", d_model=4, dict_size=10)
    with pytest.raises(ConfigError, match="unknown crosscoder kind"):
        CrossCoderConfig(kind="topk", d_model=4, dict_size=10)
    m = _random_model("l1")
    with pytest.raises(ConfigError, match=r"\[batch, 2, 6\]"):
        m.encode(torch.randn(3, 2, 7))
    with pytest.raises(CrossdiffError, match="config.json is missing"):
        CrossCoder.load(tmp_path)


def test_init_per_kind_defaults_and_bias_at_the_data_mean():
    d, F = 6, 10
    mean = torch.arange(12, dtype=torch.float64).reshape(2, d) - 4.0
    scales = torch.tensor([2.0, 0.5])
    for kind, norm, bias in (("l1", 0.05, "zero"), ("batchtopk", 1.0, "mean")):
        cfg = CrossCoderConfig(kind=kind, d_model=d, dict_size=F, k=3)
        assert (cfg.init_norm, cfg.b_dec_init) == (norm, bias)
        m = CrossCoder(cfg, scales=scales, mean=mean, seed=4)
        # the rows are a seeded Gaussian draw scaled to init_norm per model; the encoder is their transpose
        w = torch.randn(2, F, d, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
        want = w / w.norm(dim=-1, keepdim=True) * norm
        assert torch.equal(m.W_dec.detach(), want)
        assert torch.equal(m.W_enc.detach(), want.transpose(1, 2))
        np.testing.assert_allclose(m.decoder_norms().detach().numpy(), norm, rtol=1e-6)
        b_want = (mean / scales.double()[:, None]).float() if bias == "mean" else torch.zeros(2, d)
        assert torch.equal(m.b_dec.detach(), b_want)
        assert torch.equal(CrossCoder(cfg, scales=scales, seed=4).b_dec.detach(), torch.zeros(2, d))  # no mean given
    explicit = CrossCoderConfig(kind="batchtopk", d_model=d, dict_size=F, k=3, init_norm=0.2, b_dec_init="zero")
    m = CrossCoder(explicit, scales=scales, mean=mean)
    np.testing.assert_allclose(m.decoder_norms().detach().numpy(), 0.2, rtol=1e-6)
    assert not m.b_dec.detach().any()
    with pytest.raises(ConfigError, match="b_dec_init must be one of"):
        CrossCoderConfig(kind="batchtopk", d_model=d, dict_size=F, k=3, b_dec_init="median")
    with pytest.raises(ConfigError, match="init_norm must be"):
        CrossCoderConfig(kind="l1", d_model=d, dict_size=F, init_norm=0.0)


def test_threshold_ema_update():
    m = _random_model("batchtopk")
    vs = [0.5, 0.3, 0.9]
    for v in vs:
        m.update_threshold(torch.tensor(v), 0.9)
    want = vs[0]
    for v in vs[1:]:
        want = 0.9 * want + 0.1 * v
    assert float(m.threshold) == pytest.approx(want, rel=1e-6)


def test_l1_penalty_of_sparse_codes_equals_dense_and_hand_value():
    from crossdiff_core.crosscoder import l1_penalty

    f = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]], requires_grad=True)
    norms = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.5, 1.0]])  # per latent: 1, 2, 3
    rows, lat = f.detach().nonzero(as_tuple=True)
    vals = f.detach()[rows, lat].requires_grad_(True)
    # λ Σ_j f_j (||d_b|| + ||d_c||) / batch = 0.5 (2·2 + 1·1 + 3·3) / 2
    dense = l1_penalty(f, norms, 0.5)
    sparse = l1_penalty(Codes(vals, rows, lat, 2), norms, 0.5)
    assert float(dense.detach()) == pytest.approx(3.5) and float(sparse.detach()) == pytest.approx(3.5)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(vals.grad, f.grad[rows, lat])
