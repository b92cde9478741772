"""The sparse training step: loss, every gradient and Adam steps equal the dense step's and a brute-force
autograd of the DESIGN §1 formulas; the automatic choice; CUDA (marked ``cuda``: `make test` deselects them, bench/gpu_check.sh runs them)."""

import copy

import pytest
import torch

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.errors import ConfigError
from crossdiff_core.metrics import _autocast
from crossdiff_core import sparse_step
from crossdiff_core.sparse_step import sparse_below, sparse_codes_step, use_sparse
from crossdiff_core.trainer import optimisation_step
from tests.conftest import grad_of

D, F, B, K = 12, 64, 40, 4
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _model(kind, device="cpu", aux_k=6):
    cfg = CrossCoderConfig(kind=kind, d_model=D, dict_size=F, k=K, l1_coeff=0.3, aux_k=aux_k, init_norm=0.2)
    m = CrossCoder(cfg, scales=torch.tensor([1.7, 0.6]), seed=3, device=device)
    with torch.no_grad():  # off the symmetric init, so every term of the gradient is exercised
        g = torch.Generator().manual_seed(4)
        m.b_enc.copy_(0.1 * torch.randn(F, generator=g))
        m.b_dec.copy_(0.1 * torch.randn(2, D, generator=g))
        m.W_enc.add_(0.05 * torch.randn(2, D, F, generator=g))
    return m.train()


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(B, 2, D, generator=g) * torch.tensor([1.7, 0.6])[None, :, None]).to(device)


def _dead(device="cpu"):
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[::6] = True
    return dead


def brute_force_loss(m: CrossCoder, x: torch.Tensor, dead, lam: float) -> torch.Tensor:
    """The objective written out densely in float64, with a full sort for the batch selection."""
    P = {n: getattr(m, n).double() for n in PARAMS}
    xn = x.double() / m.scales.double()[None, :, None]
    pre = xn.reshape(B, 2 * D) @ P["W_enc"].reshape(2 * D, F) + P["b_enc"]
    Wd = P["W_dec"].transpose(0, 1).reshape(F, 2 * D)
    norms = P["W_dec"].norm(dim=-1).sum(0)
    if m.cfg.kind == "l1":
        f = torch.relu(pre)
    else:
        v = (torch.relu(pre) * norms).detach().reshape(-1)
        keep = torch.zeros_like(v, dtype=torch.bool)
        keep[v.argsort(descending=True)[: K * B]] = True
        f = torch.where(keep.reshape(B, F) & (v.reshape(B, F) > 0), pre, 0.0)
    x_hat = (f @ Wd).reshape(B, 2, D) + P["b_dec"]
    loss = (xn - x_hat).pow(2).sum(dim=(1, 2)).mean()
    if m.cfg.kind == "l1":
        return loss + lam * (f * norms).sum(1).mean()
    if dead is None:
        return loss
    e = (xn - x_hat).detach()
    pd = pre[:, dead]
    top = pd.detach().argsort(dim=1, descending=True)[:, : m.cfg.aux_k]
    st = pd + (torch.relu(pd) - pd).detach()  # relu forward, identity backward
    f_aux = torch.zeros_like(pd).scatter(1, top, st.gather(1, top))
    e_hat = (f_aux @ Wd[dead]).reshape(B, 2, D)
    denom = (e - e.mean(0, keepdim=True)).pow(2).sum()
    return loss + m.cfg.aux_alpha * (e - e_hat).pow(2).sum() / denom


def _grads(m, x, dead, products, lam=0.3, dtype=None):
    m.zero_grad(set_to_none=True)
    with _autocast(x.device, dtype):
        out = m.loss(x, dead=dead, l1_coeff=lam, products=products)
    out.loss.backward()
    return out, {n: grad_of(m, n).detach().clone() for n in PARAMS}


@pytest.mark.parametrize("kind,with_dead", [("batchtopk", True), ("batchtopk", False), ("l1", False)])
def test_sparse_step_equals_dense_and_brute_force(kind, with_dead, monkeypatch):
    monkeypatch.setattr(sparse_step, "GRAD_BLOCK", 7)  # the weight gradients in 10 blocks, the last partial
    m, x = _model(kind), _batch()
    dead = _dead() if with_dead else None
    out_s, g_s = _grads(m, x, dead, "sparse")
    out_d, g_d = _grads(m, x, dead, "dense")
    ref = brute_force_loss(m, x, dead, 0.3)
    g_ref = torch.autograd.grad(ref, [m.W_enc_rows if n == "W_enc" else getattr(m, n) for n in PARAMS])
    g_ref = [g.permute(1, 2, 0) if n == "W_enc" else g for n, g in zip(PARAMS, g_ref)]
    assert float(out_s.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert float(out_s.loss.detach()) == pytest.approx(float(out_d.loss.detach()), rel=1e-6)
    for field in ("recon", "sparsity", "aux", "l0"):
        assert float(getattr(out_s, field).detach()) == pytest.approx(float(getattr(out_d, field).detach()), rel=1e-6, abs=1e-7)
    assert torch.equal(out_s.fired, out_d.fired)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-5, atol=1e-6)
    if with_dead:
        assert float(out_s.aux.detach()) > 0
    for n, gr in zip(PARAMS, g_ref):
        assert float(gr.abs().max()) > 0, n
        torch.testing.assert_close(g_s[n], gr.float(), rtol=1e-4, atol=1e-6, msg=f"{n} vs brute force")
        torch.testing.assert_close(g_s[n], g_d[n], rtol=1e-4, atol=1e-6, msg=f"{n} vs dense")


def test_sparse_step_adam_steps_follow_dense():
    x, dead = _batch(), _dead()
    runs = {}
    for products in ("dense", "sparse"):
        m = _model("batchtopk")
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for step in range(4):
            out = optimisation_step(m, opt, x, l1_coeff=0.0, dead=dead, grad_clip=1.0, compute_dtype=None,
                                    step=step, products=products)
        runs[products] = (m, float(out.loss.detach()))
    (md, ld), (ms, ls) = runs["dense"], runs["sparse"]
    assert ls == pytest.approx(ld, rel=1e-5)
    for n in PARAMS:
        # 4 Adam steps move each weight by up to ~4e-3; round-off differences stay far below that
        torch.testing.assert_close(getattr(ms, n), getattr(md, n), rtol=0, atol=2e-5, msg=n)
    assert float((ms.W_enc - _model("batchtopk").W_enc).detach().abs().max()) > 1e-3


def test_sparse_step_under_bf16_autocast_matches_dense():
    m, x, dead = _model("batchtopk"), _batch(), _dead()
    out_s, g_s = _grads(m, x, dead, "sparse", dtype=torch.bfloat16)
    out_d, g_d = _grads(m, x, dead, "dense", dtype=torch.bfloat16)
    assert out_s.loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_s.values())
    assert float(out_s.loss.detach()) == pytest.approx(float(out_d.loss.detach()), rel=2e-2)
    for n in PARAMS:  # bf16 products: ~3 significant digits
        rel = float((g_s[n] - g_d[n]).norm() / g_d[n].norm())
        assert rel < 3e-2, (n, rel)


def test_sparse_codes_step_pieces_by_hand():
    # two tokens, three latents, entries (0,2), (1,0), (1,2): f, x̂ and the gradients written out
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 4, generator=g)
    W_enc = torch.randn(2, 2, 3, generator=g, requires_grad=True)
    b_enc = torch.randn(3, generator=g, requires_grad=True)
    W_dec = torch.randn(2, 3, 2, generator=g, requires_grad=True)
    pre = X @ W_enc.detach().reshape(4, 3) + b_enc.detach()
    rows, lat = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2])
    # blocks of 2 latents: {0, 1} (holding the dead latent 1) and {2}
    f, x_hat, pre_dead, dec_dead = sparse_codes_step(W_enc, b_enc, W_dec, X, pre, rows, lat, torch.tensor([1]),
                                                     block=2)
    torch.testing.assert_close(f, pre[rows, lat])
    torch.testing.assert_close(pre_dead, pre[:, [1]])
    torch.testing.assert_close(dec_dead, W_dec.detach()[:, 1].reshape(1, 4))
    want = torch.stack([f[0] * W_dec[:, 2], f[1] * W_dec[:, 0] + f[2] * W_dec[:, 2]]).detach()
    torch.testing.assert_close(x_hat.detach(), want)
    G = torch.randn(2, 2, 2, generator=g)
    Gd = torch.randn(2, 1, generator=g)
    Gw = torch.randn(1, 4, generator=g)
    ((x_hat * G).sum() + (pre_dead * Gd).sum() + (dec_dead * Gw).sum()).backward()
    # ∂/∂f_e = Σ_m G_m(n_e)·W_dec[m, j_e]; pre's gradient: those on E plus Gd on column 1
    gf = torch.stack([(G[n] * W_dec.detach()[:, j]).sum() for n, j in [(0, 2), (1, 0), (1, 2)]])
    Gpre = torch.zeros(2, 3)
    Gpre[rows, lat] = gf
    Gpre[:, 1] += Gd[:, 0]
    torch.testing.assert_close(W_enc.grad, (X.t() @ Gpre).reshape(2, 2, 3))
    torch.testing.assert_close(b_enc.grad, Gpre.sum(0))
    Fd = torch.zeros(2, 3)
    Fd[rows, lat] = f.detach()
    want_dec = torch.einsum("nj,nmd->mjd", Fd, G)
    want_dec[:, 1] += Gw.reshape(2, 2)
    torch.testing.assert_close(W_dec.grad, want_dec)


def test_choice_by_density_and_forcing():
    d_, F_, B_ = 256, 4096, 2048
    below = int(sparse_below(d_, F_) * B_ * F_)
    assert use_sparse("auto", below - 1, B_, F_, d_) and use_sparse(None, below - 1, B_, F_, d_)
    assert not use_sparse("auto", below + 1, B_, F_, d_)
    assert use_sparse("sparse", B_ * F_, B_, F_, d_) and not use_sparse("dense", 0, B_, F_, d_)
    with pytest.raises(ConfigError, match="products must be one of"):
        use_sparse("fast", 0, B_, F_, d_)
    # auto: k/F = 1/16 here, above the crossover, so the loss takes the dense path (same numbers either way)
    m, x = _model("batchtopk"), _batch()
    a = m.loss(x, dead=_dead(), products=None)
    s = m.loss(x, dead=_dead(), products="sparse")
    assert float(a.loss.detach()) == pytest.approx(float(s.loss.detach()), rel=1e-6)


@pytest.mark.cuda  # `make test` deselects it; bench/gpu_check.sh runs it on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_sparse_step_on_cuda_matches_cpu(dtype):
    x, dead = _batch(), _dead()
    m_cpu = _model("batchtopk")
    m_gpu = copy.deepcopy(m_cpu).to("cuda")
    _, g_cpu = _grads(m_cpu, x, dead, "dense", dtype=dtype)
    out, g_gpu = _grads(m_gpu, x.cuda(), dead.cuda(), "sparse", dtype=dtype)
    assert out.loss.device.type == "cuda"
    tol = 1e-4 if dtype is None else 3e-2
    for n in PARAMS:
        rel = float((g_gpu[n].cpu() - g_cpu[n]).norm() / g_cpu[n].norm())
        assert rel < tol, (n, rel)
