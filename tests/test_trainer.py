"""Trainer: schedules, metrics against numpy, exact resume, NaN guard, CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crossdiff_core.cache import ActivationCache, CacheWriter
from crossdiff_core.cli import app
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.errors import ConfigError, TrainingDivergedError
from crossdiff_core.metrics import ReconstructionStats
from crossdiff_core.trainer import CHECKPOINT, TrainConfig, Trainer, l1_factor, lr_factor, train_crosscoder


def _write_cache(path, n=3000, d=12, shards=3, seed=0, rank=4):
    """Low-rank paired data (so a crosscoder can learn it) with different scales per model."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, 2, d, generator=g)
    codes = torch.relu(torch.randn(n, rank, generator=g))
    x = torch.einsum("nr,rmd->nmd", codes, basis) + 0.05 * torch.randn(n, 2, d, generator=g)
    x[:, 0] *= 3.0
    w = CacheWriter(path, d_model=d, layer=1, dtype="float32")
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for i in range(shards):
        a, b = bounds[i], bounds[i + 1]
        m = b - a
        w.write_shard(i, x[a:b, 0], x[a:b, 1], {
            "sequence": np.arange(a, b) // 50, "position": np.arange(a, b) % 50 + 1,
            "token_id": np.zeros(m, dtype=np.int32), "source": ["text"] * m,
            "is_template": np.zeros(m, bool), "is_assistant": np.zeros(m, bool)})
    w.finalize(shards)
    return x


def test_schedules_hand_values():
    # 100 steps, 5% warm-up, 20% decay: ramps 0.2..1.0, flat, then down to 0.05 at the last step
    assert [lr_factor(s, 100, 0.05, 0.2) for s in (0, 1, 4, 5, 79)] == [0.2, 0.4, 1.0, 1.0, 1.0]
    assert lr_factor(80, 100, 0.05, 0.2) == pytest.approx(1.0)
    assert lr_factor(90, 100, 0.05, 0.2) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0.05, 0.2) == pytest.approx(0.05)
    assert [l1_factor(s, 100, 0.05) for s in (0, 1, 5, 50)] == [0.0, 0.2, 1.0, 1.0]


def test_fve_matches_numpy_and_ignores_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(97, 2, 5, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(97, 2, 5, generator=g)
    xs, xh = x.double().numpy(), x_hat.double().numpy()
    ref = [1 - ((xs[:, m] - xh[:, m]) ** 2).sum() / ((xs[:, m] - xs[:, m].mean(0)) ** 2).sum() for m in range(2)]
    for bs in (97, 10, 1):
        st = ReconstructionStats(5, 8)
        for i in range(0, 97, bs):
            st.update(x[i:i + bs], x_hat[i:i + bs], torch.tensor([1, 1, 3]))
        r = st.result()
        assert r["fve_base"] == pytest.approx(ref[0], rel=1e-9) and r["fve_chat"] == pytest.approx(ref[1], rel=1e-9)
        assert r["dead_fraction"] == pytest.approx(6 / 8)


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_resume_gives_identical_weights(tmp_path, kind):
    _write_cache(tmp_path / "cache")
    k = 3 if kind == "batchtopk" else None
    kw = dict(kind=kind, dict_size=32, k=k, l1_coeff=0.1)
    tc = dict(tokens=64 * 40, batch_size=64, lr=3e-3, val_tokens=256, val_every=10, checkpoint_every=7,
              dead_tokens=640, progress=False)  # dead after 10 steps: AuxK is active
    train_crosscoder(tmp_path / "cache", tmp_path / "full", train=TrainConfig(**tc), **kw)

    class Stop(Exception):
        pass

    def crash(step, metrics):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        train_crosscoder(tmp_path / "cache", tmp_path / "resumed", train=TrainConfig(**tc), on_metrics=crash, **kw)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["step"] == 14
    train_crosscoder(tmp_path / "cache", tmp_path / "resumed", train=TrainConfig(**tc), **kw)
    a = CrossCoder.load(tmp_path / "full").state_dict()
    b = CrossCoder.load(tmp_path / "resumed").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]) or (name == "threshold" and kind == "l1"), name
    if kind == "batchtopk":
        assert torch.isfinite(a["threshold"])
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert ma["fve_chat"] == mb["fve_chat"]


def test_training_learns_low_rank_data(tmp_path):
    _write_cache(tmp_path / "cache", n=4000)
    m = train_crosscoder(tmp_path / "cache", tmp_path / "cc", kind="batchtopk", dict_size=32, k=4,
                         train=TrainConfig(tokens=128 * 150, batch_size=128, lr=1e-2, val_tokens=400, progress=False))
    assert m["fve_base"] > 0.8 and m["fve_chat"] > 0.8
    assert m["l0"] <= 8  # threshold inference keeps L0 near k
    cfg = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert cfg["cache_manifest_hash"] == ActivationCache(tmp_path / "cache").manifest_hash
    assert cfg["training_tokens"] == 128 * 150


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    _write_cache(tmp_path / "cache")
    cache = ActivationCache(tmp_path / "cache")
    cfg = CrossCoderConfig(kind="l1", d_model=12, dict_size=16, l1_coeff=0.1)

    class Exploding(CrossCoder):
        calls = 0

        def loss(self, x, **kw):
            out = super().loss(x, **kw)
            Exploding.calls += 1
            if Exploding.calls == 6:
                return out._replace(loss=out.loss * float("nan"))
            return out

    model = Exploding(cfg, scales=cache.scales())
    tr = Trainer(model, cache, TrainConfig(tokens=64 * 10, batch_size=64, checkpoint_every=2, val_tokens=128,
                                           progress=False), tmp_path / "out")
    with pytest.raises(TrainingDivergedError, match="step 5.*lower --lr.*checkpoint"):
        tr.train()
    st = torch.load(tmp_path / "out" / CHECKPOINT, weights_only=False)
    assert st["step"] == 4 and all(torch.isfinite(v).all() for v in st["model"].values() if v.numel() > 1)


def test_mismatched_cache_and_crosscoder(tmp_path):
    _write_cache(tmp_path / "cache")
    model = CrossCoder(CrossCoderConfig(kind="l1", d_model=8, dict_size=16))
    with pytest.raises(ConfigError, match="d_model=12.*expects 8"):
        Trainer(model, ActivationCache(tmp_path / "cache"), TrainConfig(tokens=256, batch_size=64), tmp_path / "o")


def test_cli_train_and_clear_errors(tmp_path):
    _write_cache(tmp_path / "cache")
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cc"),
                                 "--kind", "batchtopk", "--dict-size", "24", "--k", "2", "--tokens", "2560",
                                 "--batch-size", "128", "--lr", "0.01", "--val-tokens", "256"])
    assert r.exit_code == 0, r.output
    assert {"fve_base", "fve_chat", "l0", "dead_fraction"} <= set(json.loads((tmp_path / "cc" / "metrics.json").read_text()))
    assert (tmp_path / "cc" / "model.safetensors").exists() and (tmp_path / "cc" / "config.json").exists()
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "x"),
                                 "--kind", "batchtopk", "--dict-size", "24", "--k", "30", "--tokens", "2560"])
    assert r.exit_code == 2 and "larger than the dictionary" in r.output
    (tmp_path / "cache" / "shards" / "shard-00001.safetensors").unlink()
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "y"),
                                 "--kind", "l1", "--dict-size", "24", "--tokens", "2560"])
    assert r.exit_code == 2 and "shard-00001" in r.output
