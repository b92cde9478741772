"""The latent analysis pass: per-latent stats against brute force over the whole cache, hand-computed
Δnorm/classes and ν on planted data, decoupling pairs, order independence, the CLI, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from crossdiff_core.analysis import LATENT_COLUMNS, AnalysisConfig, analyze, run_analysis
from crossdiff_core.cache import ActivationCache, CacheWriter
from crossdiff_core.cli import app
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.errors import CrossdiffError, ModelMismatchError
from crossdiff_core.latent_scaling import dense_above

D = 16
FINGERPRINTS = {"base": {"config": "c0", "weights": "wb"}, "chat": {"config": "c0", "weights": "wc"}}
MODELS = {"base": "b", "chat": "c", "fingerprints": FINGERPRINTS}
QUIET = dict(progress=False)


def _write_cache(path: Path, base: torch.Tensor, chat: torch.Tensor, sizes: list[int], *, seed: int = 0,
                 models: dict = MODELS, order: list[int] | None = None) -> ActivationCache:
    """Cache of ``base, chat [n, d]`` in shards of ``sizes`` (written in ``order`` of the pieces);
    every third token of sequence 1 mod 2 is a template token."""
    n = base.shape[0]
    rng = np.random.default_rng(seed)
    tmpl = rng.random(n) < 0.3
    bounds = np.cumsum([0] + sizes)
    pieces = [(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    pieces = [pieces[i] for i in (order or range(len(pieces)))]
    w = CacheWriter(path, d_model=base.shape[1], layer=3, dtype="float32", metadata={"models": models})
    for s, (a, b) in enumerate(pieces):
        rows = np.arange(a, b)
        w.write_shard(s, base[a:b], chat[a:b], {
            "sequence": rows // 10, "position": rows % 10 + 1, "token_id": rows % 97,
            "source": np.where((rows // 10) % 2 == 1, "chat", "text"), "is_template": tmpl[a:b],
            "is_assistant": np.zeros(b - a, dtype=bool)})
    w.finalize(len(pieces))
    return ActivationCache(path)


def _random_acts(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, D, generator=g) * 2.0
    chat = base + torch.randn(n, D, generator=g)
    return base, chat


def _random_model(kind: str = "l1", F: int = 40, seed: int = 0, **cfg) -> CrossCoder:
    c = CrossCoderConfig(kind=kind, d_model=D, dict_size=F, k=4 if kind == "batchtopk" else None, **cfg)
    m = CrossCoder(c, scales=torch.tensor([2.0, 2.2]), seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        m.W_dec.copy_(torch.randn(2, F, D, generator=g) * 0.3)
        m.W_dec[1, :6] *= 0.01  # base-only
        m.W_dec[0, 6:12] *= 0.01  # chat-only
        m.W_enc.copy_(torch.randn(2, D, F, generator=g) * 0.4)
        m.b_enc.copy_(torch.randn(F, generator=g) * 0.3 - 0.4)
        m.b_enc[F - 1] = -1e4  # never fires
        m.b_dec.copy_(torch.randn(2, D, generator=g) * 0.1)
        if kind == "batchtopk":
            m.threshold.fill_(0.3)
    return m.eval()


@pytest.mark.parametrize("kind,shift", [("batchtopk", 0.0), ("l1", 0.0), ("l1", -7.0)])
def test_activation_stats_match_brute_force(tmp_path, kind, shift):
    base, chat = _random_acts(700)
    cache = _write_cache(tmp_path / "c", base, chat, [300, 250, 150])
    model = _random_model(kind)
    with torch.no_grad():
        model.b_enc.add_(shift)  # L1: dense codes (0.0) and sparse codes (-7.0) take different paths
    res = analyze(model, cache, AnalysisConfig(batch_size=128, **QUIET))
    t = res.table
    assert list(t.columns) == list(LATENT_COLUMNS)
    x = torch.stack([base, chat], dim=1)
    with torch.no_grad():
        f = model.encode(x).double()  # [n, F] with the inference threshold
    tmpl = torch.from_numpy(pq.read_table(tmp_path / "c" / "tokens.parquet")["is_template"].to_numpy())
    fired = f > 0
    assert fired.sum() >= 30  # enough firings for the statistics to mean something
    if kind == "l1":
        assert (fired.double().mean() > dense_above(model.cfg.d_model)) == (shift == 0.0)
    np.testing.assert_allclose(t["freq"], fired.double().mean(0).numpy(), rtol=0, atol=1e-12)
    mx = torch.where(fired.any(0), f.max(0).values, torch.nan)
    np.testing.assert_allclose(t["max_act"], mx.numpy(), rtol=1e-6, equal_nan=True)
    share = (f * tmpl[:, None].double()).sum(0) / f.sum(0)
    np.testing.assert_allclose(t["template_share"], share.numpy(), rtol=1e-6, equal_nan=True)
    assert math.isnan(t["max_act"].iloc[-1]) and t["freq"].iloc[-1] == 0 and math.isnan(t["beta_error_chat"].iloc[-1])
    assert res.summary["dead"] == int((~fired.any(0)).sum())
    assert res.summary["cache"]["match"] == "unchecked"


def test_delta_norm_cosine_and_classes_hand_table(tmp_path):
    # (||d^b||, ||d^c||, cos(d^b, d^c)) -> Δnorm = ½((c − b)/max(b, c) + 1), class by DESIGN §1 thresholds
    table = [
        (0.0, 1.0, 0.0, 1.000, "chat_only"),
        (0.1, 2.0, 1.0, 0.975, "chat_only"),
        (0.3, 1.0, -1.0, 0.850, "other"),
        (1.0, 1.0, 1.0, 0.500, "shared"),
        (2.0, 1.7, 0.0, 0.425, "shared"),
        (1.5, 3.0, 1.0, 0.750, "other"),
        (1.0, 0.1, -1.0, 0.050, "base_only"),
        (0.5, 0.0, 0.0, 0.000, "base_only"),
    ]
    F = len(table)
    m = CrossCoder(CrossCoderConfig(kind="l1", d_model=D, dict_size=F), scales=torch.ones(2))
    e = torch.eye(D)
    with torch.no_grad():
        for j, (nb, nc, cos, _, _) in enumerate(table):
            u = e[j]
            v = e[j] if cos == 1.0 else (-e[j] if cos == -1.0 else e[j + 8])
            m.W_dec[0, j] = nb * u
            m.W_dec[1, j] = nc * v
    base, chat = _random_acts(64)
    cache = _write_cache(tmp_path / "c", base, chat, [64])
    t = analyze(m, cache, AnalysisConfig(**QUIET)).table
    np.testing.assert_allclose(t["norm_base"], [r[0] for r in table], atol=1e-7)
    np.testing.assert_allclose(t["norm_chat"], [r[1] for r in table], atol=1e-7)
    np.testing.assert_allclose(t["delta_norm"], [r[3] for r in table], atol=1e-6)
    cos_want = [r[2] if r[0] > 0 and r[1] > 0 else 0.0 for r in table]
    np.testing.assert_allclose(t["cosine"], cos_want, atol=1e-6)
    assert t["class"].tolist() == [r[4] for r in table]


def _planted(tmp_path: Path):
    """Four orthogonal concepts and a crosscoder with the two L1 artifacts built in by hand.

    concept 0: chat-only (base writes nothing)                -> latent 0, chat-only, ν_ε = ν_r = 0
    concept 1: weakly shared, base writes 0.3× the chat vector -> latent 1, chat-only (base row shrunk to 0)
    concept 2: shared                                          -> latent 2, shared
    concept 3: shared but split: chat-only latent 3 + base-only latent 4, same tokens (Latent Decoupling)
    latent 5: base-only, orthogonal direction, fires on concept 0's tokens (no decoupling pair)
    """
    n = 2000
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(n, 4, generator=g) < 0.3) * torch.exp(0.3 * torch.randn(n, 4, generator=g))
    e = torch.eye(D)
    scale_b = torch.tensor([0.0, 0.3, 1.0, 1.0])
    base = a @ (scale_b[:, None] * e[:4])
    chat = a @ e[:4]
    F = 6
    m = CrossCoder(CrossCoderConfig(kind="l1", d_model=D, dict_size=F), scales=torch.ones(2))
    with torch.no_grad():
        m.W_enc.zero_()
        m.b_enc.zero_()
        m.W_dec.zero_()
        for j, c in enumerate([0, 1, 2, 3, 3, 0]):
            m.W_enc[1, c, j] = 1.0  # read concept c from the chat activation: f_j = a_c
        m.W_dec[1, 0] = e[0]
        m.W_dec[1, 1] = e[1]
        m.W_dec[0, 2], m.W_dec[1, 2] = e[2], e[2]
        m.W_dec[1, 3] = e[3]
        m.W_dec[0, 4] = e[3] + e[5] * 0.05  # cosine with e[3] ≈ 0.9988
        m.W_dec[0, 5] = e[6]
    return m.eval(), _write_cache(tmp_path / "c", base, chat, [700, 1300]), a


def test_planted_artifacts_get_the_expected_nu(tmp_path):
    m, cache, a = _planted(tmp_path)
    res = analyze(m, cache, AnalysisConfig(batch_size=256, **QUIET))
    t = res.table.set_index("latent")
    assert t["class"].tolist() == ["chat_only", "chat_only", "shared", "chat_only", "base_only", "base_only"]
    # chat-only concept: nothing of it in the base model
    assert t.loc[0, "nu_error"] == pytest.approx(0.0, abs=1e-6) and t.loc[0, "nu_recon"] == pytest.approx(0.0, abs=1e-6)
    # Complete Shrinkage: the base error still carries 0.3 of the direction
    assert t.loc[1, "beta_error_base"] == pytest.approx(0.3, rel=1e-5)
    assert t.loc[1, "nu_error"] == pytest.approx(0.3, rel=1e-5) and t.loc[1, "nu_recon"] == pytest.approx(0.0, abs=1e-6)
    # Latent Decoupling: the base reconstruction carries latent 3's direction through latent 4, the base error not
    assert t.loc[3, "nu_recon"] == pytest.approx(1.0, rel=1e-5) and t.loc[3, "nu_error"] == pytest.approx(0.0, abs=1e-6)
    assert t.loc[2, "nu_error"] == pytest.approx(1.0, rel=1e-5)
    f = res.filters
    assert f["fixed"].tolist() == [True, False, False, False, False, False]
    assert res.summary["filters"]["fixed"]["latents"] == [0]
    assert t.loc[0, "nu_rank"] < t.loc[1, "nu_rank"] and t.loc[0, "nu_rank"] < t.loc[3, "nu_rank"]
    # decoupling: only (3, 4); they fire on exactly the same tokens
    p = res.pairs
    assert p[["chat_latent", "base_latent"]].values.tolist() == [[3, 4]]
    n3 = int((a[:, 3] > 0).sum())
    assert p["fires_chat"].iloc[0] == n3 and p["fires_both"].iloc[0] == n3 and p["cofire_given_chat"].iloc[0] == 1.0
    assert p["cosine"].iloc[0] == pytest.approx(1 / math.sqrt(1 + 0.0025), rel=1e-5)
    assert res.summary["decoupling"]["n_pairs"] == 1 and res.summary["decoupling"]["n_cofiring_pairs"] == 1


def test_result_independent_of_batch_size_and_shard_order(tmp_path):
    base, chat = _random_acts(600, seed=1)
    c1 = _write_cache(tmp_path / "a", base, chat, [200, 150, 250])
    c2 = _write_cache(tmp_path / "b", base, chat, [200, 150, 250], order=[2, 0, 1])  # same tokens, shards permuted
    for kind in ("l1", "batchtopk"):
        model = _random_model(kind)
        ref = analyze(model, c1, AnalysisConfig(batch_size=600, **QUIET)).table
        for cache, bs in ((c1, 37), (c2, 128), (c2, 600)):
            got = analyze(model, cache, AnalysisConfig(batch_size=bs, **QUIET)).table
            # float32 per-batch products, float64 sums across batches: equal to float32 round-off
            # (ν = β^b/β^c magnifies it where β^c is near 0)
            nu_cols = ["nu_error", "nu_recon"]
            pd.testing.assert_frame_equal(got.drop(columns=nu_cols), ref.drop(columns=nu_cols), rtol=1e-5, atol=1e-6,
                                          check_exact=False)
            pd.testing.assert_frame_equal(got[nu_cols], ref[nu_cols], rtol=1e-3, check_exact=False)


def test_model_mismatch_and_other_caches(tmp_path):
    base, chat = _random_acts(200)
    train = _write_cache(tmp_path / "train", base, chat, [200])
    same_models = _write_cache(tmp_path / "held_out", base[:100] * 1.5, chat[:100], [100])
    # the same model names (paths) but other content: a chat model rebuilt at the same path
    rebuilt = {**MODELS, "fingerprints": {**FINGERPRINTS, "chat": {"config": "c0", "weights": "other"}}}
    other_models = _write_cache(tmp_path / "other", base, chat, [200], models=rebuilt)
    model = _random_model(cache=str(tmp_path / "train"), cache_manifest_hash=train.manifest_hash)
    assert analyze(model, train, AnalysisConfig(**QUIET)).summary["cache"]["match"] == "same cache"
    assert analyze(model, same_models, AnalysisConfig(**QUIET)).summary["cache"]["match"] == "same models"
    with pytest.raises(ModelMismatchError, match="allow-other-cache"):
        analyze(model, other_models, AnalysisConfig(**QUIET))
    assert analyze(model, other_models, AnalysisConfig(allow_other_cache=True, **QUIET)).summary["cache"]["match"] == "allowed"
    # the training cache is gone: the models cannot be compared
    model.cfg.cache = str(tmp_path / "nowhere")
    with pytest.raises(ModelMismatchError, match="cannot be"):
        analyze(model, same_models, AnalysisConfig(**QUIET))
    wide = _write_cache(tmp_path / "wide", torch.randn(50, 2 * D), torch.randn(50, 2 * D), [50])
    with pytest.raises(ModelMismatchError, match="d_model=32"):
        analyze(_random_model(), wide, AnalysisConfig(**QUIET))


def test_batchtopk_without_threshold_is_a_clear_error(tmp_path):
    base, chat = _random_acts(100)
    cache = _write_cache(tmp_path / "c", base, chat, [100])
    model = _random_model("batchtopk")
    model.threshold.fill_(float("nan"))
    with pytest.raises(CrossdiffError, match="threshold"):
        analyze(model, cache, AnalysisConfig(**QUIET))


def test_missing_token_table_gives_nan_template_share(tmp_path):
    base, chat = _random_acts(100)
    cache = _write_cache(tmp_path / "c", base, chat, [100])
    (tmp_path / "c" / "tokens.parquet").unlink()
    with pytest.warns(UserWarning, match="template_share"):
        t = analyze(_random_model(), cache, AnalysisConfig(**QUIET)).table
    assert t["template_share"].isna().all() and (t["freq"] > 0).sum() > 30


def test_cli_writes_latents_summary_and_plots(tmp_path):
    base, chat = _random_acts(300)
    _write_cache(tmp_path / "c", base, chat, [300])
    _random_model("batchtopk").save(tmp_path / "cc")
    out = tmp_path / "res" / "latents.parquet"
    r = CliRunner().invoke(app, ["analyze", "--crosscoder", str(tmp_path / "cc"), "--cache", str(tmp_path / "c"),
                                 "--out", str(out), "--plots", str(tmp_path / "plots"), "--batch-size", "64",
                                 "--direction", "chat", "--nu-error-max", "0.3"])
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.column_names == list(LATENT_COLUMNS) and table.num_rows == 40
    assert table.schema.field("class").type == "string" and table.schema.field("latent").type == "int64"
    summary = json.loads((tmp_path / "res" / "latents.summary.json").read_text())
    assert summary["direction"] == "chat" and summary["filters"]["fixed"]["nu_error_max"] == 0.3
    assert sum(summary["classes"].values()) == 40
    assert json.loads(r.stdout)["classes"] == summary["classes"]
    for name in ("delta_norm_hist.png", "nu_scatter.png", "beta_by_class.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "res").glob("*.tmp"))


def test_cli_bad_input_messages(tmp_path):
    base, chat = _random_acts(100)
    _write_cache(tmp_path / "c", base, chat, [100])
    _random_model("l1").save(tmp_path / "cc")
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    stats = {"mean": [0.0] * D, "mean_sq_norm": 1.0}
    (empty / "manifest.json").write_text(json.dumps({
        "d_model": D, "layer": 0, "n_tokens": 0, "dtype": "float32",
        "shards": [{"file": "shards/shard-00000.safetensors", "rows": 0, "sha256": "0"}],
        "stats": {"base": stats, "chat": stats}}))
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", "--crosscoder", str(tmp_path / "cc"), "--cache", str(empty),
                            "--out", str(tmp_path / "o.parquet")])
    assert r.exit_code == 2 and "empty" in r.output
    r = runner.invoke(app, ["analyze", "--crosscoder", str(tmp_path / "cc"), "--cache", str(tmp_path / "c"),
                            "--out", str(tmp_path / "o.parquet"), "--direction", "sideways"])
    assert r.exit_code == 2 and "direction" in r.output
    assert not (tmp_path / "o.parquet").exists()


def test_run_analysis_default_summary_path_and_parquet_metadata(tmp_path):
    base, chat = _random_acts(150)
    _write_cache(tmp_path / "c", base, chat, [150])
    _random_model("l1").save(tmp_path / "cc")
    res = run_analysis(tmp_path / "cc", tmp_path / "c", tmp_path / "latents.parquet", cfg=AnalysisConfig(**QUIET))
    meta = json.loads(pq.read_schema(tmp_path / "latents.parquet").metadata[b"crossdiff"])
    assert meta["direction"] == "auto" and meta["cache"]["n_tokens"] == 150
    assert json.loads((tmp_path / "latents.summary.json").read_text())["classes"] == res.summary["classes"]


def test_a_latent_that_never_fires_is_dead_not_its_delta_norm_class(tmp_path):
    m, cache, _ = _planted(tmp_path)
    with torch.no_grad():  # latent 3 (chat-only by Δnorm, in the decoupling pair (3, 4)) never fires now
        m.W_enc[:, :, 3] = 0.0
        m.b_enc[3] = -1.0
    res = analyze(m, cache, AnalysisConfig(batch_size=256, **QUIET))
    t = res.table.set_index("latent")
    assert t.loc[3, "delta_norm"] == pytest.approx(1.0) and t.loc[3, "freq"] == 0
    assert t["class"].tolist() == ["chat_only", "chat_only", "shared", "dead", "base_only", "base_only"]
    assert res.summary["classes"] == {"chat_only": 2, "base_only": 2, "shared": 1, "other": 0, "dead": 1}
    assert res.summary["dead"] == 1 and res.summary["fired"]["dead"] == 0
    assert not any(f[3] for f in res.filters.values())
    assert len(res.pairs) == 0 and res.summary["decoupling"]["n_pairs"] == 0  # (3, 4) is no pair of live latents


def test_dead_class_codes_override_delta_norm():
    from crossdiff_core.decoder_norms import CLASSES, class_codes, classify

    dn = torch.tensor([0.5, 0.5, 0.95, 0.05, 0.75])
    fired = torch.tensor([True, False, False, True, True])
    assert classify(dn) == ["shared", "shared", "chat_only", "base_only", "other"]
    assert classify(dn, fired) == ["shared", "dead", "dead", "base_only", "other"]
    assert class_codes(dn, fired).tolist() == [CLASSES.index(c) for c in ("shared", "dead", "dead", "base_only", "other")]


def test_summary_scales_and_the_per_model_warning(tmp_path):
    """`scales` in the summary: the crosscoder's s_b, s_c, their ratio, the convention, the cache's own
    sqrt(q_c / q_b), and a warning only when per-model scales meet a norm ratio outside [0.9, 1.1]."""
    base, _ = _random_acts(600, seed=4)
    chat = 1.5 * base  # the chat model's mean squared norm is 2.25x the base's
    cache = _write_cache(tmp_path / "c", base, chat, [600])
    q = {m: cache.manifest["stats"][m]["mean_sq_norm"] for m in ("base", "chat")}
    r = math.sqrt(q["chat"] / q["base"])
    assert r == pytest.approx(1.5, rel=1e-6)
    s_b = math.sqrt(q["base"] / D)
    for conv, scales in (("per_model", [s_b, r * s_b]), ("joint", [math.sqrt((q["base"] + q["chat"]) / 2 / D)] * 2),
                         ("none", [1.0, 1.0])):
        m = _random_model(normalisation=conv)
        m.scales.copy_(torch.tensor(scales))
        sc = analyze(m, cache, AnalysisConfig(**QUIET)).summary["scales"]
        assert sc["convention"] == conv and sc["norm_ratio"] == pytest.approx(1.5, rel=1e-6)
        assert [sc["base"], sc["chat"]] == pytest.approx(scales, rel=1e-6)
        assert sc["ratio"] == pytest.approx(scales[1] / scales[0], rel=1e-6)
        if conv == "per_model":
            # an equal latent: Δnorm ½((1/1.5 − 1) + 1) = 1/3; ν scaled by s_c/s_b = 1.5
            assert "Δnorm 0.33" in sc["warning"] and "1.50" in sc["warning"] and "normalisation: joint" in sc["warning"]
        else:
            assert sc["warning"] is None
    legacy = _random_model()  # config without the convention (older crosscoders): inferred from unequal scales
    sc = analyze(legacy, cache, AnalysisConfig(**QUIET)).summary["scales"]
    assert sc["convention"] == "per_model" and sc["warning"] is not None
    same = _write_cache(tmp_path / "same", base, base * 1.02, [600])  # within [0.9, 1.1]: no warning
    assert analyze(_random_model(), same, AnalysisConfig(**QUIET)).summary["scales"]["warning"] is None
