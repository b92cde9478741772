"""Data-parallel training (crossdiff_core.distributed): 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.distributed import GlobalBatch
from crossdiff_core.trainer import TrainConfig, train_crosscoder
from tests.test_trainer import _write_cache

WORLD = 2


def _reductions_worker(rank: int, init_file: str, v_all: torch.Tensor, e_all: torch.Tensor, k: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        share = v_all.shape[0] // WORLD
        gb = GlobalBatch()
        thr = gb.kth_largest(v_all[rank * share:(rank + 1) * share], k)
        den = gb.aux_denominator(e_all[rank * share:(rank + 1) * share])
        idx, t = gb.top_entries(v_all[rank * share:(rank + 1) * share], k)
        torch.save({"thr": thr, "den": den, "idx": idx, "t": t}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_global_reductions_match_the_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    B, F, k = 16, 40, 3
    v = torch.relu(torch.randn(B, F, generator=g))
    v[:8, :5] = 2.5  # ties straddling the ranks, and more of them on rank 0
    v[3, 7] = 9.0
    e = torch.randn(B, 2, 6, generator=g, dtype=torch.float64) + 1.0
    out = str(tmp_path / "red")
    mp.spawn(_reductions_worker, args=(str(tmp_path / "init"), v, e, k, out), nprocs=WORLD, join=True)
    # independent: the (k·B)-th largest of all B·F scores, and Σ||e − mean(e)||² of the whole batch
    want_thr = torch.sort(v.reshape(-1), descending=True).values[k * B - 1]
    e_np = e.numpy()
    want_den = float(((e_np - e_np.mean(0)) ** 2).sum()) / WORLD
    for r in range(WORLD):
        got = torch.load(f"{out}.{r}")
        assert float(got["thr"]) == float(want_thr)
        assert float(got["den"]) == pytest.approx(want_den, rel=1e-12)
        # this rank's entries at or above the global threshold, as flat indices of its own [share, F]
        mine = v[r * (B // WORLD):(r + 1) * (B // WORLD)].reshape(-1)
        assert float(got["t"]) == float(want_thr)
        assert torch.equal(got["idx"], torch.nonzero(mine >= want_thr).squeeze(1))


def test_two_processes_train_the_same_crosscoder_as_one(tmp_path):
    """BatchTopK with AuxK active: the global selection, the AuxK denominator, the dead-latent counters
    and DDP's gradient averaging all have to be right for the weights to agree."""
    kind = "batchtopk"
    _write_cache(tmp_path / "cache", n=4000, d=16)
    k = 3
    train = dict(tokens=64 * 40, batch_size=64, lr=3e-3, val_tokens=256, val_every=20, checkpoint_every=0,
                 dead_tokens=640, warmup_frac=0.1, progress=False)  # dead after 10 steps: AuxK is active
    train["crosscoder"] = dict(dict_size=48, k=k, l1_coeff=0.1)
    torch.set_num_threads(1)
    one = train_crosscoder(tmp_path / "cache", tmp_path / "one", kind=kind, train=TrainConfig.from_dict(train))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
         "-m", "crossdiff_core.distributed", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "two"),
         "--config", json.dumps({"kind": kind, "train": train})],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    # training moved the weights far beyond the tolerance, so the agreement is not trivial
    init = CrossCoder(CrossCoderConfig(kind=kind, d_model=16, dict_size=48, k=k), seed=0).W_dec.detach()
    assert (a["W_dec"] - init).abs().max() > 100 * 1e-5
    assert torch.isfinite(a["threshold"]) and float(a["threshold"]) > 0  # the EMA threshold ran
    history = json.loads((tmp_path / "one" / "history.json").read_text())
    assert any(m["dead_train_fraction"] > 0 for m in history)  # AuxK had dead latents to work on
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["fve_chat"] == pytest.approx(one["fve_chat"], abs=1e-4)
    assert two["l0"] == pytest.approx(one["l0"], rel=1e-3)
    assert two["dead_train_fraction"] == one["dead_train_fraction"]
