"""The partitioned crosscoder kinds (issue 13): ``shared`` (tied decoders on designated latents, a reduced L1
weight on them) and ``dfc`` (latents exclusive to one model). Their constraints hold exactly through real
training (dense and sparse steps, checkpoint resume), their loss is the hand-computed objective, and bad
settings or weights that break the constraints are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from crossdiff_core.cli import app
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig, CrossCoderSettings
from crossdiff_core.decoder_norms import decoder_stats
from crossdiff_core.errors import ConfigError, CrossdiffError
from crossdiff_core.trainer import TrainConfig, optimisation_step, train_crosscoder
from tests.conftest import grad_of
from tests.test_trainer import _write_cache

D, F = 12, 32
SMALL = dict(tokens=64 * 40, batch_size=64, lr=3e-3, val_tokens=256, val_every=10, checkpoint_every=7,
             dead_tokens=640, progress=False)  # dead after 10 steps: AuxK is active for dfc


def _settings(kind):
    return CrossCoderSettings(dict_size=F, k=3, l1_coeff=0.1, shared_fraction=0.25, shared_l1_ratio=0.15,
                              dfc_exclusive=0.125)


def _train(tmp_path, kind, out="cc", on_metrics=None, **tc):
    return train_crosscoder(tmp_path / "cache", tmp_path / out, kind=kind, on_metrics=on_metrics,
                            train=TrainConfig(crosscoder=_settings(kind), **(SMALL | tc)))


def _init(kind):
    """The weights train_crosscoder starts from (the init does not depend on the cache but for b_dec)."""
    return CrossCoder(_settings(kind).config(kind, D), seed=0)


def test_partition_layout_and_settings_per_kind():
    s = _settings("shared")
    shared, dfc, l1 = s.config("shared", D), s.config("dfc", D), s.config("l1", D)
    assert shared.partition() == {"tied": range(0, 8), "free": range(8, 32)}
    assert dfc.partition() == {"base_exclusive": range(0, 4), "chat_exclusive": range(4, 8), "shared": range(8, 32)}
    assert l1.partition() == {"free": range(0, 32)}
    # each kind keeps its own knobs: the sparsity family's (k / λ) and its partition settings
    assert (shared.k, shared.l1_coeff, shared.shared_fraction, shared.shared_l1_ratio, shared.dfc_exclusive) == \
        (None, 0.1, 0.25, 0.15, None)
    assert (dfc.k, dfc.l1_coeff, dfc.shared_fraction, dfc.dfc_exclusive) == (3, 0.0, None, 0.125)
    assert (l1.shared_fraction, l1.shared_l1_ratio, l1.dfc_exclusive) == (None, None, None)
    assert (shared.sparsity, dfc.sparsity, shared.init_norm, dfc.init_norm, dfc.b_dec_init) == \
        ("l1", "batchtopk", 0.05, 1.0, "mean")
    # a config made directly takes the settings' defaults for its own kind
    assert CrossCoderConfig(kind="shared", d_model=D, dict_size=100, l1_coeff=1.0).shared_fraction == \
        CrossCoderSettings.shared_fraction


@pytest.mark.parametrize("bad,match", [
    (dict(shared_fraction=0.0), "shared_fraction must be in \\(0, 1\\)"),
    (dict(shared_fraction=1.0), "shared_fraction must be in"),
    (dict(shared_fraction=float("nan")), "shared_fraction must be in"),
    (dict(shared_l1_ratio=0.0), "shared_l1_ratio must be in \\(0, 1\\]"),
    (dict(shared_l1_ratio=1.5), "shared_l1_ratio"),
    (dict(dfc_exclusive=0.5), "2 x dfc_exclusive < 1"),
    (dict(dfc_exclusive=-0.1), "dfc_exclusive must be in"),
])
def test_bad_partition_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        CrossCoderSettings(**bad)
    kind = "dfc" if "dfc_exclusive" in bad else "shared"
    with pytest.raises(ConfigError, match=match):
        CrossCoderConfig(kind=kind, d_model=D, dict_size=F, k=3, l1_coeff=1.0, **bad)


def test_a_partition_too_small_for_the_dictionary_is_refused():
    with pytest.raises(ConfigError, match="designates 0 tied latents.*--dict-size"):
        CrossCoderConfig(kind="shared", d_model=D, dict_size=16, l1_coeff=1.0, shared_fraction=0.01)
    with pytest.raises(ConfigError, match="0 exclusive latents per model"):
        CrossCoderConfig(kind="dfc", d_model=D, dict_size=16, k=2, dfc_exclusive=0.01)
    with pytest.raises(ConfigError, match="some latents stay shared"):
        CrossCoderConfig(kind="dfc", d_model=D, dict_size=4, k=2, dfc_exclusive=0.45)  # 2 + 2 exclusive of 4


def _hand_loss(m: CrossCoder, x: torch.Tensor, lam: float) -> torch.Tensor:
    """recon + λ Σ_j w_j f_j (||d_j^b|| + ||d_j^c||), batch mean, in float64 from the raw weights."""
    xn = x.double() / m.scales.double()[None, :, None]
    We, be, Wd, bd = (getattr(m, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    f = torch.relu(torch.einsum("bmd,mdf->bf", xn, We) + be)
    x_hat = torch.einsum("bf,mfd->bmd", f, Wd) + bd
    w = torch.ones(F, dtype=torch.float64)
    w[:8] = m.cfg.shared_l1_ratio
    penalty = lam * (f * (w * Wd.norm(dim=-1).sum(0))).sum(1).mean()
    return (xn - x_hat).pow(2).sum(dim=(1, 2)).mean() + penalty


@pytest.mark.parametrize("products", ["dense", "sparse"])
def test_shared_loss_is_the_hand_computation(products):
    m = _init("shared")
    m.scales.copy_(torch.tensor([1.7, 0.6]))
    with torch.no_grad():  # off the init, with tied rows still equal
        g = torch.Generator().manual_seed(1)
        m.b_enc.copy_(0.05 * torch.randn(F, generator=g))
        m.W_dec.mul_(20.0)
    x = torch.randn(40, 2, D, generator=torch.Generator().manual_seed(2)) * torch.tensor([1.7, 0.6])[None, :, None]
    out = m.loss(x, l1_coeff=0.3, products=products)
    assert float(out.sparsity.detach()) > 0
    assert float(out.loss.detach()) == pytest.approx(float(_hand_loss(m, x, 0.3)), rel=1e-5)
    # the tied rows' gradient is that of one parameter: both halves get the sum of the untied gradients
    out.loss.backward()
    free = _init("shared")
    free.load_state_dict(m.state_dict())
    free.W_dec = torch.nn.Parameter(m.W_dec.detach().clone())  # the same weights, without the tie's hook
    free.loss(x, l1_coeff=0.3, products=products).loss.backward()
    g_free = free.W_dec.grad
    torch.testing.assert_close(m.W_dec.grad[0, :8], g_free[0, :8] + g_free[1, :8])
    assert torch.equal(m.W_dec.grad[0, :8], m.W_dec.grad[1, :8])
    torch.testing.assert_close(m.W_dec.grad[:, 8:], g_free[:, 8:])


@pytest.mark.parametrize("products", ["dense", "sparse"])
def test_shared_decoder_stays_tied_through_training_and_resume(tmp_path, products):
    _write_cache(tmp_path / "cache")
    _train(tmp_path, "shared", products=products)
    m, init = CrossCoder.load(tmp_path / "cc").requires_grad_(False), _init("shared").requires_grad_(False)
    assert torch.equal(m.W_dec[0, :8], m.W_dec[1, :8])
    assert bool(((m.W_dec[0, :8] - init.W_dec[0, :8]).abs().max(-1).values > 1e-4).all())  # every tied row moved
    assert not torch.equal(m.W_dec[0, 8:], m.W_dec[1, 8:])  # the free latents are free
    assert torch.equal(decoder_stats(m.W_dec)["delta_norm"][:8], torch.full((8,), 0.5))
    if products == "dense":
        return

    class Stop(Exception):
        pass

    def crash(step, metrics):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        _train(tmp_path, "shared", out="resumed", on_metrics=crash, products=products)
    _train(tmp_path, "shared", out="resumed", products=products)
    r = CrossCoder.load(tmp_path / "resumed")
    assert torch.equal(r.W_dec, m.W_dec) and torch.equal(r.W_enc, m.W_enc)


def test_dfc_exclusive_latents_stay_exclusive_through_training(tmp_path):
    _write_cache(tmp_path / "cache")
    metrics = _train(tmp_path, "dfc", products="sparse")
    m, init = CrossCoder.load(tmp_path / "cc").requires_grad_(False), _init("dfc").requires_grad_(False)
    assert metrics["fve_base"] > 0 and metrics["fve_chat"] > 0
    zeros = [m.W_dec[1, :4], m.W_dec[0, 4:8], m.W_enc[1, :, :4], m.W_enc[0, :, 4:8]]
    assert all(bool((z == 0).all()) for z in zeros)
    own = [m.W_dec[0, :4], m.W_dec[1, 4:8], m.W_enc[0, :, :4], m.W_enc[1, :, 4:8]]
    own_init = [init.W_dec[0, :4], init.W_dec[1, 4:8], init.W_enc[0, :, :4], init.W_enc[1, :, 4:8]]
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(own, own_init))
    dn = decoder_stats(m.W_dec)["delta_norm"]
    assert torch.equal(dn[:4], torch.zeros(4)) and torch.equal(dn[4:8], torch.ones(4))  # base-only 0, chat-only 1
    assert bool(torch.isfinite(m.threshold))  # BatchTopK's inference threshold was learnt


def _dfc_model():
    m = CrossCoder(CrossCoderConfig(kind="dfc", d_model=D, dict_size=F, k=4, aux_k=6, init_norm=0.2,
                                    dfc_exclusive=0.125), scales=torch.tensor([1.7, 0.6]), seed=3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        m.b_enc.copy_(0.1 * torch.randn(F, generator=g))
        m.b_dec.copy_(0.1 * torch.randn(2, D, generator=g))
        m.W_enc.add_(0.05 * torch.randn(2, D, F, generator=g))
        m.enforce_constraints()
    return m.train()


def test_dfc_dense_and_sparse_steps_agree():
    x = torch.randn(40, 2, D, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.7, 0.6])[None, :, None]
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::5] = True  # AuxK on some exclusive latents too
    grads, runs = {}, {}
    for products in ("dense", "sparse"):
        m = _dfc_model()
        out = m.loss(x, dead=dead, products=products)
        out.loss.backward()
        grads[products] = (out, {n: grad_of(m, n).clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
        assert bool((m.W_dec.grad[1, :4] == 0).all() and (grad_of(m, "W_enc")[0, :, 4:8] == 0).all())
        m = _dfc_model()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for step in range(4):
            optimisation_step(m, opt, x, l1_coeff=0.0, dead=dead, grad_clip=1.0, compute_dtype=None, step=step,
                              products=products)
        assert m.constraint_violations() == []
        runs[products] = m
    (od, gd), (os_, gs) = grads["dense"], grads["sparse"]
    assert float(os_.loss.detach()) == pytest.approx(float(od.loss.detach()), rel=1e-6) and float(od.aux.detach()) > 0
    for n in gd:
        torch.testing.assert_close(gs[n], gd[n], rtol=1e-4, atol=1e-6, msg=n)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(runs["sparse"], n), getattr(runs["dense"], n), rtol=0, atol=2e-5, msg=n)


@pytest.mark.parametrize("kind,break_it,match", [
    ("shared", lambda sd: sd["W_dec"][1, 3].add_(1e-6), "1 of the 8 tied latents.*W_dec\\[0, j\\] != W_dec\\[1, j\\]"),
    ("dfc", lambda sd: sd["W_enc"][1, 2, 1].fill_(0.1), "1 base_exclusive latents.*W_enc\\[1\\]"),
    ("dfc", lambda sd: sd["W_dec"][0, 5].fill_(0.1), "1 chat_exclusive latents.*W_dec\\[0\\]"),
])
def test_load_refuses_weights_that_break_the_partition(tmp_path, kind, break_it, match):
    _init(kind).save(tmp_path)
    assert CrossCoder.load(tmp_path).constraint_violations() == []
    sd = load_file(str(tmp_path / "model.safetensors"))
    break_it(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CrossdiffError, match=f"model.safetensors breaks the {kind} crosscoder's partition.*{match}"):
        CrossCoder.load(tmp_path)


def test_config_json_partition_keys_are_read_tolerantly_and_typed(tmp_path):
    _init("shared").save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["shared_fraction"], cfg["shared_l1_ratio"], cfg["dfc_exclusive"]) == (0.25, 0.15, None)
    del cfg["shared_l1_ratio"]  # missing: the default
    assert CrossCoderConfig.from_dict(cfg).shared_l1_ratio == CrossCoderSettings.shared_l1_ratio
    with pytest.raises(ConfigError, match="shared_fraction must be a number"):
        CrossCoderConfig.from_dict(cfg | {"shared_fraction": "a quarter"})


def test_cli_trains_a_dfc_crosscoder_and_refuses_foreign_options(tmp_path):
    _write_cache(tmp_path / "cache")
    args = ["train", "--cache", str(tmp_path / "cache"), "--tokens", "2560", "--batch-size", "128", "--lr", "0.01",
            "--val-tokens", "256", "--dict-size", "24"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cc"), "--kind", "dfc", "--k", "2",
                                 "--dfc-exclusive", "0.125"])
    assert r.exit_code == 0, r.output
    m = CrossCoder.load(tmp_path / "cc")
    assert (m.cfg.kind, m.cfg.k, m.cfg.dfc_exclusive, m.cfg.shared_fraction) == ("dfc", 2, 0.125, None)
    assert m.partition()["chat_exclusive"] == range(3, 6) and bool((m.W_dec[0, 3:6] == 0).all())
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--kind", "l1", "--shared-fraction", "0.1"])
    assert r.exit_code == 2 and "--shared-fraction applies to shared crosscoders only" in r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "y"), "--kind", "shared", "--k", "4"])
    assert r.exit_code == 2 and "--k applies to batchtopk crosscoders only" in r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "z"), "--kind", "dfc", "--dfc-exclusive", "0.5"])
    assert r.exit_code == 2 and "--dfc-exclusive" in r.output
