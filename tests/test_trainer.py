"""Trainer: schedules, metrics against numpy, exact resume, NaN guard, CLI."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crossdiff_core.cache import ActivationCache, CacheWriter
from crossdiff_core.cli import app
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig, CrossCoderSettings
from crossdiff_core.errors import ConfigError, TrainingDivergedError
from crossdiff_core.metrics import ReconstructionStats
from crossdiff_core.checkpoint import read_checkpoint
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
    kw = dict(kind=kind)
    tc = dict(tokens=64 * 40, batch_size=64, lr=3e-3, val_tokens=256, val_every=10, checkpoint_every=7,
              dead_tokens=640, progress=False)  # dead after 10 steps: AuxK is active
    tc["crosscoder"] = CrossCoderSettings(dict_size=32, k=k, l1_coeff=0.1)
    train_crosscoder(tmp_path / "cache", tmp_path / "full", train=TrainConfig(**tc), **kw)

    class Stop(Exception):
        pass

    def crash(step, metrics):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        train_crosscoder(tmp_path / "cache", tmp_path / "resumed", train=TrainConfig(**tc), on_metrics=crash, **kw)
    assert read_checkpoint(tmp_path / "resumed")["step"] == 14
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
    m = train_crosscoder(tmp_path / "cache", tmp_path / "cc", kind="batchtopk",
                         train=TrainConfig(crosscoder=CrossCoderSettings(dict_size=32, k=4), tokens=128 * 150,
                                           batch_size=128, lr=1e-2, val_tokens=400, progress=False))
    assert m["fve_base"] > 0.8 and m["fve_chat"] > 0.8
    assert m["l0"] <= 8  # threshold inference keeps L0 near k
    cfg = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert cfg["cache_manifest_hash"] == ActivationCache(tmp_path / "cache").manifest_hash
    assert cfg["training_tokens"] == 128 * 150


@pytest.mark.parametrize("native", [False, True])
def test_bf16_without_native_support_is_warned_about(tmp_path, monkeypatch, caplog, native):
    # emulated bf16 (an AVX2-only CPU) is ~20x slower than fp32: the run still trains, and says so
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    _write_cache(tmp_path / "cache", n=1000)
    with caplog.at_level(logging.WARNING, logger="crossdiff_core.trainer"):
        m = train_crosscoder(tmp_path / "cache", tmp_path / "cc", kind="l1",
                             train=TrainConfig(crosscoder=CrossCoderSettings(dict_size=16), tokens=128 * 4,
                                               batch_size=128, val_tokens=200, dtype="bfloat16", progress=False))
    assert math.isfinite(m["fve_base"])
    warned = [r.getMessage() for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert bool(warned) is (not native)
    assert not warned or "set train.dtype: float32" in warned[0]


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
    st = read_checkpoint(tmp_path / "out")
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


# ---- checkpoints: data only, refused when foreign, whole after a kill -------------------------------
_SMALL = dict(tokens=64 * 20, batch_size=64, lr=3e-3, val_tokens=256, val_every=5, checkpoint_every=5,
              dead_tokens=640, progress=False)


def _checkpointed(tmp_path, **cc):
    """A trainer over a small cache that has just written its step-0 checkpoint."""
    _write_cache(tmp_path / "cache")
    cache = ActivationCache(tmp_path / "cache")
    cfg = CrossCoderConfig(kind="batchtopk", d_model=12, dict_size=16, k=3, **cc)
    tr = Trainer(CrossCoder(cfg, scales=cache.scales()), cache, TrainConfig(**_SMALL), tmp_path / "out")
    tr.save_checkpoint()
    return tr


def test_malicious_pickle_checkpoint_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    _write_cache(tmp_path / "cache")
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / "checkpoint.pt").write_bytes(pickle.dumps(Evil()))
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cc"),
                                 "--kind", "l1", "--dict-size", "16", "--l1-coeff", "0.1", "--tokens", "1280",
                                 "--batch-size", "64", "--val-tokens", "256"])
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    assert "checkpoint.pt" in msg and "pickle" in msg and "delete" in msg
    assert not marker.exists() and not (tmp_path / "cc" / "model.safetensors").exists()


def _garbage_json(out):
    (out / CHECKPOINT).write_text("{not json")


def _foreign_json(out):
    (out / CHECKPOINT).write_text('{"step": 3}')


def _tensors(out):
    return out / json.loads((out / CHECKPOINT).read_text())["tensors"]


def _truncated(out):
    t = _tensors(out)
    t.write_bytes(t.read_bytes()[:-100])


def _missing(out):
    _tensors(out).unlink()


def _escaping(out):
    doc = json.loads((out / CHECKPOINT).read_text())
    (out / CHECKPOINT).write_text(json.dumps(doc | {"tensors": "../checkpoint-0123456789abcdef.safetensors"}))


def _garbage_with_matching_sha(out):
    import hashlib

    _tensors(out).write_bytes(b"\x08" + b"\0" * 7 + b"not a header")
    doc = json.loads((out / CHECKPOINT).read_text())
    doc["sha256"] = hashlib.sha256(_tensors(out).read_bytes()).hexdigest()
    (out / CHECKPOINT).write_text(json.dumps(doc))


def _directory(out):
    for p in out.glob("checkpoint*"):
        p.unlink()
    (out / CHECKPOINT).mkdir()


@pytest.mark.parametrize("damage, problem", [
    (_garbage_json, "checkpoint.json: is not a readable checkpoint record"),
    (_foreign_json, "checkpoint.json: is not a crossdiff checkpoint record"),
    (_truncated, ".safetensors: does not match the sha256"),
    (_missing, "checkpoint.json: names checkpoint-.*, which is missing"),
    (_escaping, "checkpoint.json: names the tensors file '../checkpoint"),
    (_garbage_with_matching_sha, ".safetensors: is not a readable checkpoint"),
    (_directory, "checkpoint.json: is not a regular file"),
])
def test_damaged_checkpoint_is_refused_naming_file_and_fix(tmp_path, damage, problem):
    from crossdiff_core.errors import CheckpointError

    tr = _checkpointed(tmp_path)
    damage(tmp_path / "out")
    with pytest.raises(CheckpointError, match=problem) as err:
        tr.try_resume()
    assert str(tmp_path / "out") in str(err.value) and "to start training over" in str(err.value)


def test_checkpoint_round_trip_is_exact(tmp_path):
    tr = _checkpointed(tmp_path)
    for _ in range(3):  # some Adam state and dead-latent counts to carry
        x = next(tr._batches())
        out = tr._optimise(x, l1_coeff=0.0, dead=None)
        tr._note_fired(out.fired, x.shape[0])
        tr.step += 1
    tr.history = [{"step": 3, "fve_chat": float("nan"), "mse": 0.25}]
    tr.save_checkpoint()
    st = read_checkpoint(tmp_path / "out")
    want = tr._state()
    assert st["step"] == 3 and st["train_config"] == json.loads(json.dumps(want["train_config"]))
    assert st["history"][0]["mse"] == 0.25 and st["history"][0]["fve_chat"] != st["history"][0]["fve_chat"]
    for name, t in want["model"].items():
        assert torch.equal(st["model"][name], t) or (t.isnan().all() and st["model"][name].isnan().all()), name
    assert torch.equal(st["since_fired"], want["since_fired"])
    for i, s in want["opt"]["state"].items():
        for n, t in s.items():
            assert st["opt"]["state"][i][n].dtype == t.dtype and torch.equal(st["opt"]["state"][i][n], t), (i, n)
    assert st["opt"]["param_groups"][0]["lr"] == want["opt"]["param_groups"][0]["lr"]
    assert [p.name for p in (tmp_path / "out").iterdir()] != [] and len(list((tmp_path / "out").glob("*.safetensors"))) == 1


def test_rerun_with_other_settings_names_each_difference(tmp_path):
    tr = _checkpointed(tmp_path)
    cfg = CrossCoderConfig(kind="batchtopk", d_model=12, dict_size=16, k=4)
    other = Trainer(CrossCoder(cfg, scales=tr.cache.scales()), tr.cache, TrainConfig(**_SMALL | {"lr": 1e-3}),
                    tmp_path / "out")
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0\.003 -> 0\.001; model\.k: 3 -> 4\)"):
        other.try_resume()
    neutral = Trainer(CrossCoder(tr.model.cfg, scales=tr.cache.scales()), tr.cache,
                      TrainConfig(**_SMALL | {"val_every": 3, "progress": True}), tmp_path / "out")
    assert neutral.try_resume()  # settings that do not change the result still resume


_KILLED_WRITER = """
import json, os, signal, sys
import crossdiff_core.fileio as fileio
from crossdiff_core.trainer import TrainConfig, train_crosscoder

real, writes = fileio.fsync_file, []


def fsync_then_die(path):  # killed with the 2nd checkpoint's tensors and record written, not yet renamed
    real(path)
    if os.path.basename(str(path)).startswith(".checkpoint.json.tmp"):
        writes.append(path)
        if len(writes) == 2:
            os.kill(os.getpid(), signal.SIGKILL)


fileio.fsync_file = fsync_then_die
kw, tc = json.loads(sys.argv[3]), json.loads(sys.argv[4])
train_crosscoder(sys.argv[1], sys.argv[2], train=TrainConfig.from_dict(tc), **kw)
"""


def test_killed_checkpoint_write_resumes_exactly_and_leaves_nothing(tmp_path):
    import os
    import subprocess
    import sys

    _write_cache(tmp_path / "cache")
    kw, tc = dict(kind="batchtopk"), _SMALL | {"crosscoder": {"dict_size": 32, "k": 3}}
    train_crosscoder(tmp_path / "cache", tmp_path / "full", train=TrainConfig.from_dict(tc), **kw)
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "cache"), str(out), json.dumps(kw),
                        json.dumps(tc)], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert p.returncode == -9, p.stderr
    assert len(list(out.glob(".checkpoint.json.tmp-*"))) == 1 and len(list(out.glob("checkpoint-*.safetensors"))) == 2
    assert read_checkpoint(out)["step"] == 5  # the record still names the first checkpoint, whole
    train_crosscoder(tmp_path / "cache", out, train=TrainConfig.from_dict(tc), **kw)
    assert not list(out.glob(".checkpoint*")) and len(list(out.glob("checkpoint-*.safetensors"))) == 1
    a, b = CrossCoder.load(tmp_path / "full").state_dict(), CrossCoder.load(out).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "full" / "history.json").read_text() == (out / "history.json").read_text()


def test_threshold_decay_spans_a_tenth_of_the_run():
    from crossdiff_core.trainer import threshold_decay

    assert threshold_decay(1000) == pytest.approx(0.99)
    assert threshold_decay(586) == pytest.approx(1 - 1 / 58.6)
    assert threshold_decay(50) == pytest.approx(0.9)  # at least a 10-step window
    assert threshold_decay(10_000) == threshold_decay(10 ** 6) == pytest.approx(0.999)  # the paper's, from 10k steps
    assert threshold_decay(1000, 0.5) == 0.5  # an explicit decay wins


def test_batchtopk_decoder_bias_starts_at_the_cache_mean(tmp_path):
    x = _write_cache(tmp_path / "cache")
    seen = {}

    def spy(model, cache, train, out, on_metrics=None):
        seen[model.cfg.kind] = (model.b_dec.detach().clone(), model.scales.clone(), model.decoder_norms().detach())
        return Trainer(model, cache, train, out, on_metrics=on_metrics)

    for kind in ("l1", "batchtopk"):
        train_crosscoder(tmp_path / "cache", tmp_path / kind, kind=kind, trainer_cls=spy,
                         train=TrainConfig(crosscoder=CrossCoderSettings(dict_size=16, k=2), tokens=128, batch_size=64,
                                           val_tokens=256, progress=False))
    b, s, norms = seen["batchtopk"]
    want = x.double().mean(0) / s.double()[:, None]  # [2, d]: the data mean in normalised units
    np.testing.assert_allclose(b.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms.numpy(), 1.0, rtol=1e-6)
    b, _, norms = seen["l1"]
    assert not b.any() and torch.allclose(norms, torch.tensor(0.05))  # L1 keeps its zero bias and small rows


def test_planted_world_batchtopk_uses_its_dictionary(tmp_path):
    """The dead-latent fix on planted data: the old recipe (decoder rows at 0.05, zero b_dec, θ's EMA at 0.999,
    AuxK at 1/32) leaves a third of the latents never firing at inference; the new defaults use almost all and
    recover more."""
    from crossdiff_core.metrics import evaluate
    from crossdiff_core.synthetic import SyntheticConfig, load_truth, score, write_cache

    cfg = SyntheticConfig(d_model=16, n_shared=24, n_chat_only=8, n_base_only=8, n_weakly_shared=8, n_changed=8,
                          mean_active=3.0, n_tokens=20_000, shard_tokens=20_000, seed=1)
    write_cache(cfg, tmp_path / "cache")
    cache, truth = ActivationCache(tmp_path / "cache"), load_truth(tmp_path / "cache")
    res, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # small products: one thread is faster, and much faster on a busy machine
    try:
        for name, cc in (("old", dict(init_norm=0.05, b_dec_init="zero", threshold_decay=0.999, aux_alpha=1 / 32)), ("new", {})):
            tc = TrainConfig(crosscoder=CrossCoderSettings(dict_size=256, k=4, **cc), tokens=100_000, batch_size=256,
                             lr=3e-3, val_every=0, checkpoint_every=0, dead_tokens=10_000, progress=False)
            train_crosscoder(tmp_path / "cache", tmp_path / name, kind="batchtopk", train=tc)
            model = CrossCoder.load(tmp_path / name).eval()
            full = evaluate(model, (x for _, x in cache.iter_sequential(4096, dtype=torch.float32)))  # as analysis counts
            res[name] = (full["dead_fraction"], full["l0"], score(model, truth)["recovery"]["overall"])
    finally:
        torch.set_num_threads(threads)
    (dead_old, l0_old, rec_old), (dead_new, l0_new, rec_new) = res["old"], res["new"]
    assert dead_old > 0.25 and dead_new <= 0.05
    assert abs(l0_new - 4) < 0.5 < abs(l0_old - 4)  # the old θ lagged behind the scores: L0 far from k
    assert rec_new > rec_old
