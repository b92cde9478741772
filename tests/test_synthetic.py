"""Planted-truth generator and scoring, checked against independent computations: numpy least squares
on the raw activations, and hand-built decoders whose Δnorm classes are worked out by hand."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from crossdiff_core.cache import ActivationCache
from crossdiff_core.cli import app
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.synthetic import (PLANTED_CLASSES, SyntheticConfig, generate, load_truth, make_truth,
                                      match_features, score, write_cache)

# Few features, d larger than all directions together: each token's activations can be solved for exactly.
SMALL = dict(d_model=64, n_shared=8, n_chat_only=8, n_base_only=8, n_weakly_shared=8, n_changed=8,
             mean_active=4.0, noise_std=0.0, n_tokens=6000, seq_len=50, shard_tokens=2500,
             template_frac=0.2, template_feature_frac=0.5)


def _idx(truth, cls):
    return (truth.class_code == PLANTED_CLASSES.index(cls)).nonzero().squeeze(1)


@pytest.fixture(scope="module")
def small():
    return generate(SyntheticConfig(**SMALL))


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = write_cache(SyntheticConfig(**SMALL), out)
    return out, manifest


def test_truth_classes_by_construction():
    t = make_truth(SyntheticConfig(**SMALL))
    sh, co, bo, ws, ch = (_idx(t, c) for c in PLANTED_CLASSES)
    assert [len(i) for i in (sh, co, bo, ws, ch)] == [8] * 5
    nb, nc = t.dir_base.norm(dim=-1), t.dir_chat.norm(dim=-1)
    # absent = zero direction and zero scale; present = unit direction
    assert torch.all(nb[co] == 0) and torch.all(t.scale_base[co] == 0)
    assert torch.all(nc[bo] == 0) and torch.all(t.scale_chat[bo] == 0)
    for idx, norms in ((torch.cat([sh, bo, ws, ch]), nb), (torch.cat([sh, co, ws, ch]), nc)):
        np.testing.assert_allclose(norms[idx].numpy(), 1.0, atol=1e-5)
    cos = (t.dir_base * t.dir_chat).sum(-1)
    assert torch.all(cos[sh] > 0.99) and torch.all(cos[sh] < 1.0)  # jittered, not identical
    np.testing.assert_allclose(cos[ws].numpy(), 1.0, atol=1e-5)
    assert torch.all((cos[ch] >= 0.3 - 1e-5) & (cos[ch] <= 0.6 + 1e-5))
    ratio = t.scale_base / t.scale_chat.clamp_min(1e-12)
    assert torch.all((ratio[ws] >= 0.2 - 1e-6) & (ratio[ws] <= 0.5 + 1e-6))
    np.testing.assert_allclose(ratio[torch.cat([sh, ch])].numpy(), 1.0, rtol=1e-6)
    # probabilities sum to mean_active, except where a template-only feature's p/share hits 1
    tf = t.template_only
    np.testing.assert_allclose(t.freq[~tf].numpy(), t.prob[~tf].numpy())
    np.testing.assert_allclose(t.freq[tf].numpy(), (t.prob[tf] * 0.5 * 0.2).numpy(), rtol=1e-6)
    assert float(t.prob.max()) <= 1.0 and 3.5 < float(t.freq.sum()) <= 4.0 + 1e-5
    # template-only features: half of the chat-only ones, and only those
    assert sorted(t.template_only.nonzero().squeeze(1).tolist()) == sorted(
        i for i in co.tolist() if t.template_only[i]) and int(t.template_only.sum()) == 4


def test_mixing_equation_recovered_by_least_squares(small, small_cache):
    """Solve every token for the planted activations with numpy and check the generative model:
    presence per class, one activation driving both models, firing rates, magnitudes, template-only."""
    base, chat, t = small
    cfg = t.config
    wb, wc = (w.double().numpy() for w in t.write_vectors())
    pres_b, pres_c = t.scale_base.numpy() > 0, t.scale_chat.numpy() > 0
    xb, xc = base.double().numpy(), chat.double().numpy()
    ab = np.linalg.lstsq(wb[pres_b].T, xb.T, rcond=None)[0]
    ac = np.linalg.lstsq(wc[pres_c].T, xc.T, rcond=None)[0]
    # without noise each model lies exactly in the span of the features present in it:
    # base carries nothing of the chat-only features, chat nothing of the base-only ones
    assert np.abs(wb[pres_b].T @ ab - xb.T).max() < 1e-4
    assert np.abs(wc[pres_c].T @ ac - xc.T).max() < 1e-4
    A_b, A_c = np.zeros((t.n_features, len(xb))), np.zeros((t.n_features, len(xc)))
    A_b[pres_b], A_c[pres_c] = ab, ac
    both = pres_b & pres_c
    np.testing.assert_allclose(A_b[both], A_c[both], atol=1e-4)  # one activation drives both models
    A = np.where(pres_c[:, None], A_c, A_b)  # [N, n]
    assert A.min() > -1e-4
    fired = A > 1e-4
    freq = t.freq.numpy()
    assert np.all(np.abs(fired.mean(1) - freq) < 5 * np.sqrt(freq / len(xb)) + 1e-3)
    assert abs(fired.sum(0).mean() - cfg.mean_active) < 0.15
    logs = np.log(A[fired])  # LogNormal(0, magnitude_sigma)
    assert abs(logs.mean()) < 0.03 and abs(logs.std() - cfg.magnitude_sigma) < 0.03
    # template-only features fire only on template tokens (layout read back from the cache)
    tok = pq.read_table(small_cache[0] / "tokens.parquet").to_pandas()
    is_tmpl = tok["is_template"].to_numpy()
    tf = t.template_only.numpy()
    assert fired[tf][:, ~is_tmpl].sum() == 0 and fired[tf][:, is_tmpl].mean() > 0.05
    # token_id = 1 + strongest planted feature of the token
    strongest = np.where(fired.any(0), A.argmax(0) + 1, 0)
    np.testing.assert_array_equal(tok["token_id"].to_numpy(), strongest)


def test_noise_is_independent_per_model():
    counts = dict(n_shared=4, n_chat_only=4, n_base_only=4, n_weakly_shared=4, n_changed=4)
    cfg = SyntheticConfig(**{**SMALL, **counts, "noise_std": 0.3, "mean_active": 0.5, "n_tokens": 4000})
    base, chat, t = generate(cfg)
    wb, wc = (w.double().numpy() for w in t.write_vectors())
    # residual off the span of every planted direction is pure noise
    span = np.concatenate([wb[wb.any(1)], wc[wc.any(1)]])
    q, _ = np.linalg.qr(span.T)  # 4 + 4·4 + 4 < 64 independent directions
    rb = base.double().numpy() - base.double().numpy() @ q @ q.T
    rc = chat.double().numpy() - chat.double().numpy() @ q @ q.T
    dof = cfg.d_model - q.shape[1]
    assert (rb**2).sum(1).mean() / dof == pytest.approx(0.09, rel=0.05)
    assert abs((rb * rc).sum(1).mean() / dof) < 0.005


def test_deterministic_per_seed():
    cfg = SyntheticConfig(**{**SMALL, "n_tokens": 3000})
    b1, c1, t1 = generate(cfg)
    b2, c2, t2 = generate(SyntheticConfig(**{**SMALL, "n_tokens": 3000}))
    assert torch.equal(b1, b2) and torch.equal(c1, c2) and torch.equal(t1.dir_chat, t2.dir_chat)
    b3, _, t3 = generate(SyntheticConfig(**{**SMALL, "n_tokens": 3000, "seed": 1}))
    assert not torch.equal(b1, b3) and not torch.equal(t1.dir_chat, t3.dir_chat)


def test_cache_round_trip(small, small_cache):
    base, chat, t = small
    out, manifest = small_cache
    cache = ActivationCache(out, verify="full")
    assert (cache.d_model, cache.n_tokens, manifest["dtype"], len(manifest["shards"])) == (64, 6000, "float32", 3)
    x = cache.read_rows(0, cache.n_tokens)
    assert torch.equal(x[:, 0], base) and torch.equal(x[:, 1], chat)
    tok = cache.tokens().to_pandas()
    rows = np.arange(6000)
    np.testing.assert_array_equal(tok["sequence"], rows // 50)
    np.testing.assert_array_equal(tok["position"], rows % 50 + 1)
    chat_seq = (rows // 50) % 2 == 1
    np.testing.assert_array_equal(tok["source"], np.where(chat_seq, "chat", "text"))
    assert not tok["is_template"][~chat_seq].any()
    assert 0.15 < tok["is_template"][chat_seq].mean() < 0.25
    np.testing.assert_array_equal(tok["is_assistant"], chat_seq & ~tok["is_template"].to_numpy())
    assert manifest["synthetic"]["n_shared"] == 8
    t2 = load_truth(out)
    for name in ("class_code", "dir_base", "dir_chat", "scale_base", "scale_chat", "freq", "template_only"):
        assert torch.equal(getattr(t, name), getattr(t2, name)), name
    assert t2.config == t.config


def test_bfloat16_cache(tmp_path):
    m = write_cache(SyntheticConfig(**{**SMALL, "n_tokens": 1000}), tmp_path, dtype="bfloat16")
    assert m["dtype"] == "bfloat16" and ActivationCache(tmp_path).read_rows(0, 10).shape == (10, 2, 64)


def _hand_built(t, scales=(1.0, 1.0), extra=50, seed=0):
    """A crosscoder whose first N latents (shuffled) decode the planted write vectors exactly."""
    N = t.n_features
    F = N + extra
    cc = CrossCoder(CrossCoderConfig("l1", t.config.d_model, F), scales=torch.tensor(scales), seed=seed)
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(seed))
    wb, wc = t.write_vectors()
    with torch.no_grad():
        cc.W_dec[0, perm[:N]] = wb / scales[0]
        cc.W_dec[1, perm[:N]] = wc / scales[1]
    return cc, perm[:N]


def test_score_hand_built_crosscoder():
    t = make_truth(SyntheticConfig(**SMALL))
    cc, where = _hand_built(t)
    s = score(cc, t)
    assert s["recovery"] == {**{c: 1.0 for c in PLANTED_CLASSES}, "overall": 1.0}
    np.testing.assert_array_equal(s["matches"]["latent"].to_numpy(), where.numpy())
    # Δnorm by hand: equal norms -> shared (0.5); one side zero -> chat-only/base-only;
    # weakly shared ρ ∈ [0.2, 0.5] -> Δnorm = 1 − ρ/2 ∈ [0.75, 0.9] -> "other"
    expected = {"shared": "shared", "chat_only": "chat_only", "base_only": "base_only",
                "weakly_shared": "other", "changed_direction": "shared"}
    for c, dn_class in expected.items():
        # score() has no data pass, so no matched latent is ever class dead
        assert s["confusion"][c] == {k: (8 if k == dn_class else 0)
                                     for k in ("chat_only", "base_only", "shared", "other", "dead")}
    assert s["chat_only_share"]["weakly_shared"] == 0.0 and s["chat_only_share"]["chat_only"] == 1.0
    ws = _idx(t, "weakly_shared")
    rho = (t.scale_base / t.scale_chat)[ws]
    np.testing.assert_allclose(s["matches"]["delta_norm"].to_numpy()[ws], (1 - rho / 2).numpy(), rtol=1e-5)
    # the ideal Δnorm uses the crosscoder's scales; with (1, 1) it equals the hand-built decoder's
    np.testing.assert_allclose(s["matches"]["ideal_delta_norm"], s["matches"]["delta_norm"], atol=1e-5)

    # Complete Shrinkage, by hand: zero the base rows of the weakly-shared latents -> labelled chat-only
    with torch.no_grad():
        cc.W_dec[0, where[ws]] = 0
    s2 = score(cc, t)
    assert s2["recovery"]["weakly_shared"] == 1.0 and s2["chat_only_share"]["weakly_shared"] == 1.0
    assert s2["confusion"]["weakly_shared"]["chat_only"] == 8


def test_changed_direction_needs_both_rows_and_scales_are_respected():
    t = make_truth(SyntheticConfig(**SMALL))
    cc, where = _hand_built(t, scales=(2.0, 0.5))
    ch = _idx(t, "changed_direction")
    # different model scales: same directions, so recovery holds; Δnorm in normalised space differs
    m = match_features(cc.W_dec, t, scales=cc.scales)
    assert m["recovered"].all()
    dn_shared = m["delta_norm"].to_numpy()[_idx(t, "shared")]
    np.testing.assert_allclose(dn_shared, 0.5 * ((2.0 - 0.5) / 2.0 + 1), rtol=1e-5)  # norms 1/2 and 1/0.5
    np.testing.assert_allclose(m["ideal_delta_norm"], m["delta_norm"], atol=1e-5)
    # a changed-direction latent whose base row points the chat way is not a match
    with torch.no_grad():
        cc.W_dec[0, where[ch]] = t.dir_chat[ch]
    m2 = match_features(cc.W_dec, t)
    assert not m2["recovered"].to_numpy()[ch].any()
    assert m2["recovered"].to_numpy()[_idx(t, "shared")].all()


def test_random_crosscoder_recovers_nothing():
    t = make_truth(SyntheticConfig())
    cc = CrossCoder(CrossCoderConfig("batchtopk", 64, 1024, k=8), seed=3)
    s = score(cc, t)
    assert s["recovery"]["overall"] == 0.0
    assert s["matches"]["cosine"].max() < 0.7  # random rows in d=64 stay far from any planted direction


def test_errors():
    with pytest.raises(ConfigError, match="weak_scale"):
        SyntheticConfig(weak_scale=(0.5, 1.2))
    with pytest.raises(ConfigError, match="mean_active"):
        SyntheticConfig(mean_active=0)
    with pytest.raises(ConfigError, match="probabilities above 1"):
        make_truth(SyntheticConfig(n_shared=5, n_chat_only=0, n_base_only=0, n_weakly_shared=0, n_changed=0,
                                   mean_active=4.0, freq_spread=100.0))
    with pytest.raises(CacheError, match="crossdiff synth"):
        load_truth("/nonexistent-dir")
    t = make_truth(SyntheticConfig(**SMALL))
    with pytest.raises(ConfigError, match=r"\[2, F, 64\]"):
        match_features(torch.zeros(2, 10, 32), t)


def test_cli_synth_train_score(tmp_path):
    """`crossdiff synth` -> `crossdiff train` -> `crossdiff synth-score` on a tiny planted set (d=16)."""
    runner = CliRunner()
    cache, cc = tmp_path / "cache", tmp_path / "cc"
    r = runner.invoke(app, ["synth", "--out", str(cache), "--n-tokens", "10000", "--d-model", "16", "--shared", "6",
                            "--chat-only", "2", "--base-only", "2", "--weakly-shared", "2", "--changed", "2",
                            "--mean-active", "1.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_tokens"] == 10000
    assert load_truth(cache).n_features == 14
    r = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(cc), "--kind", "batchtopk", "--dict-size", "48",
                            "--k", "2", "--tokens", str(256 * 150), "--batch-size", "256", "--lr", "1e-2",
                            "--val-every", "0"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "score.json"
    r = runner.invoke(app, ["synth-score", "--crosscoder", str(cc), "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())
    assert set(s["recovery"]) == set(PLANTED_CLASSES) | {"overall"}
    # 150 steps already find most planted features (a random decoder finds none, see above)
    assert s["recovery"]["overall"] > 0.6
    assert s["confusion"]["chat_only"]["chat_only"] >= 1 and s["confusion"]["base_only"]["base_only"] >= 1
    assert len(pq.read_table(out.with_suffix(".parquet"))) == 14
    r = runner.invoke(app, ["synth-score", "--crosscoder", str(cc), "--cache", str(tmp_path)])
    assert r.exit_code == 2 and "crossdiff synth" in r.output


# ---- input normalisation (crossdiff_core.normalisation): which scales keep shared features shared ----------

def test_input_scales_hand_computed():
    from crossdiff_core.normalisation import input_scales

    d = 16
    q = torch.tensor([4.0 * d, 9.0 * d])  # E||x_b||² = 4d, E||x_c||² = 9d
    torch.testing.assert_close(input_scales(q, d, "per_model"), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(input_scales(q, d, "joint"), torch.full((2,), 6.5 ** 0.5))  # sqrt((4 + 9) / 2)
    torch.testing.assert_close(input_scales(q, d, "none"), torch.ones(2))
    with pytest.raises(ConfigError, match="per_model"):
        input_scales(q, d, "paper")
    with pytest.raises(ConfigError, match="finite and positive"):
        input_scales(torch.tensor([0.0, 1.0]), d, "joint")


def test_equal_features_stay_at_half_unless_per_model_scales_a_grown_norm():
    """A world whose chat norm grew 1.74x in directions no planted feature uses: a perfect latent of a shared
    feature (equal write vectors in model units) has Δnorm 0.5 under joint and none, 1 / (2 · 1.32) under per_model."""
    from crossdiff_core.normalisation import input_scales
    from crossdiff_core.synthetic import ideal_delta_norm

    t = make_truth(SyntheticConfig(**SMALL))
    shared = _idx(t, "shared")
    wb, wc = t.write_vectors()
    torch.testing.assert_close(wb[shared].norm(dim=-1), wc[shared].norm(dim=-1))  # equal in model units
    q = torch.tensor([10.0, 17.4])
    r = 1.74 ** 0.5
    for conv, want in (("joint", 0.5), ("none", 0.5), ("per_model", 0.5 / r)):
        dn = ideal_delta_norm(t, input_scales(q, SMALL["d_model"], conv))[shared]
        torch.testing.assert_close(dn, torch.full_like(dn, want), msg=conv)


def test_trainer_uses_the_configured_normalisation(small_cache, tmp_path):
    from dataclasses import replace

    from crossdiff_core.crosscoder import CrossCoderSettings
    from crossdiff_core.trainer import TrainConfig, train_crosscoder

    cache, manifest = small_cache
    q = torch.tensor([manifest["stats"][m]["mean_sq_norm"] for m in ("base", "chat")], dtype=torch.float64)
    d = manifest["d_model"]
    want = {"per_model": (q / d).sqrt(), "joint": (q.mean() / d).sqrt().expand(2), "none": torch.ones(2)}
    tc = TrainConfig(tokens=512, batch_size=256, val_tokens=256, val_every=0, checkpoint_every=0, progress=False)
    for conv, s in want.items():
        out = tmp_path / conv
        train_crosscoder(cache, out, kind="l1",
                         train=replace(tc, crosscoder=CrossCoderSettings(dict_size=32, normalisation=conv)))
        m = CrossCoder.load(out)
        torch.testing.assert_close(m.scales, s.float(), msg=conv)
        assert m.cfg.normalisation == conv
        assert json.loads((out / "config.json").read_text())["normalisation"] == conv
    assert CrossCoderConfig.from_dict({"kind": "l1", "d_model": 4, "dict_size": 8}).normalisation is None  # older file
    with pytest.raises(ConfigError, match="normalisation"):
        CrossCoderConfig(kind="l1", d_model=4, dict_size=8, normalisation="raw")


def test_norm_growth_names_the_massive_dimensions():
    from crossdiff_core.normalisation import norm_growth

    mean_b, mean_c = np.zeros(8), np.zeros(8)
    mean_b[1], mean_c[1], mean_c[5] = 1.0, 1.0, 3.0  # dim 5: a massive activation of the chat model only
    stats = {"base": {"mean": mean_b.tolist(), "mean_sq_norm": 10.0}, "chat": {"mean": mean_c.tolist(), "mean_sq_norm": 20.0}}
    g = norm_growth(stats, top_k=2)
    assert g["source"] == "mean"
    assert [t["dim"] for t in g["chat"]["top_dims"]] == [5, 1]
    assert g["chat"]["top_dims"][0]["share"] == pytest.approx(9 / 20) and g["chat"]["mean_share"] == pytest.approx(10 / 20)
    assert g["growth"]["ratio"] == 2.0 and g["growth"]["top_dims"][0] == {"dim": 5, "delta": 9.0, "share": 0.9}
    stats["base"]["mean_sq"] = [1.25] * 8  # per-dim second moments when the writer recorded them
    stats["chat"]["mean_sq"] = [1.25] * 7 + [11.25]
    g = norm_growth(stats, top_k=1)
    assert g["source"] == "mean_sq" and g["growth"]["top_dims"][0]["dim"] == 7 and g["growth"]["top_share"] == 1.0


def test_cache_info_reports_what_carries_the_norm(small_cache):
    from crossdiff_core.cache import cache_summary

    cache, manifest = small_cache
    g = cache_summary(cache, verify=False, check_values=False)["norm_growth"]
    st = manifest["stats"]
    assert g["growth"]["ratio"] == pytest.approx(st["chat"]["mean_sq_norm"] / st["base"]["mean_sq_norm"])
    mu = np.asarray(st["chat"]["mean"])
    top = int(np.argmax(np.abs(mu)))
    assert g["chat"]["top_dims"][0] == {"dim": top, "mean": mu[top], "share": mu[top] ** 2 / st["chat"]["mean_sq_norm"]}
