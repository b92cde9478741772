"""Activation cache: format, round trip, statistics, shuffling, resume and corruption handling.

Expected values come from numpy/torch computed here on the original data, or from caches written by
hand with safetensors (as another tool would), never from the cache module's own output.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from crossdiff_core.cache import ActivationCache, CacheWriter, plan_shuffle
from crossdiff_core.errors import CacheError, ConfigError

D = 16


def _tokens(n: int, seq0: int = 0) -> dict:
    pos = np.arange(n) % 7 + 1
    return {
        "sequence": seq0 + np.arange(n) // 7,
        "position": pos,
        "token_id": (np.arange(n) * 31) % 1000,
        "source": ["text" if (seq0 + i // 7) % 2 == 0 else "chat" for i in range(n)],
        "is_template": pos == 1,
        "is_assistant": pos > 4,
    }


def _data(sizes: list[int], d: int = D, seed: int = 0, row_ids: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-shard (base, chat) float32; with row_ids, column 0 holds +global row (base) and -global row (chat)."""
    g = torch.Generator().manual_seed(seed)
    out, row = [], 0
    for n in sizes:
        b = torch.randn(n, d, generator=g) * 3 + 1
        c = torch.randn(n, d, generator=g) * 0.5 - 2
        if row_ids:
            ids = torch.arange(row, row + n, dtype=torch.float32)
            b[:, 0], c[:, 0] = ids, -ids
        out.append((b, c))
        row += n
    return out


def _write(path: Path, data, dtype: str = "bfloat16", background: bool = False, metadata: dict | None = None) -> dict:
    w = CacheWriter(path, d_model=data[0][0].shape[1], layer=4, dtype=dtype, metadata=metadata or {"models": {"base": "b", "chat": "c"}})
    seq = 0
    for i, (b, c) in enumerate(data):
        w.write_shard(i, b, c, _tokens(len(b), seq), background=background)
        seq += 1000
    return w.finalize(len(data))


def _hand_cache(path: Path, arrays: list[np.ndarray], dtype=torch.float32, manifest_extra: dict | None = None) -> None:
    """A cache written the way another tool might: safetensors + a manifest with only the required keys."""
    (path / "shards").mkdir(parents=True)
    shards = []
    for i, a in enumerate(arrays):
        f = f"shards/shard-{i:05d}.safetensors"
        t = torch.from_numpy(a)
        save_file({"base": t[:, 0].to(dtype).contiguous(), "chat": t[:, 1].to(dtype).contiguous()}, path / f)
        shards.append({"file": f, "rows": len(a), "sha256": hashlib.sha256((path / f).read_bytes()).hexdigest()})
    allx = np.concatenate(arrays).astype(np.float64)
    d = arrays[0].shape[2]
    m = {
        "d_model": d,
        "layer": 1,
        "n_tokens": int(sum(len(a) for a in arrays)),
        "dtype": "float32" if dtype == torch.float32 else "bfloat16",
        "shards": shards,
        "stats": {
            name: {"mean": allx[:, k].mean(0).tolist(), "mean_sq_norm": float((allx[:, k] ** 2).sum(1).mean())}
            for k, name in enumerate(("base", "chat"))
        },
    }
    m.update(manifest_extra or {})
    (path / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_float32_exact_and_layout(tmp_path):
    data = _data([7, 13, 5])
    m = _write(tmp_path, data, dtype="float32")
    base = torch.cat([b for b, _ in data])
    chat = torch.cat([c for _, c in data])
    cache = ActivationCache(tmp_path, verify="full")
    assert (cache.d_model, cache.layer, cache.n_tokens, cache.dtype) == (D, 4, 25, torch.float32)
    assert m["models"] == {"base": "b", "chat": "c"}
    x = cache.read_rows(0, 25)
    assert x.shape == (25, 2, D) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], base) and torch.equal(x[:, 1], chat)
    assert torch.equal(cache.read_rows(5, 21), x[5:21])  # spans all three shards
    assert cache.read_rows(3, 3).shape == (0, 2, D)
    # iter_sequential: in order, last batch short
    got = list(cache.iter_sequential(6, start=2, stop=25))
    assert [s for s, _ in got] == [2, 8, 14, 20] and got[-1][1].shape[0] == 5
    assert torch.equal(torch.cat([t for _, t in got]), x[2:25])
    # the files follow the documented layout, readable with plain safetensors / pyarrow
    from safetensors.torch import load_file

    s1 = load_file(tmp_path / "shards/shard-00001.safetensors")
    assert torch.equal(s1["base"], data[1][0]) and torch.equal(s1["chat"], data[1][1])
    assert [s["rows"] for s in m["shards"]] == [7, 13, 5]
    assert [s["file"] for s in m["shards"]] == [f"shards/shard-{i:05d}.safetensors" for i in range(3)]


def test_round_trip_bfloat16(tmp_path):
    data = _data([9, 11])
    _write(tmp_path, data, dtype="bfloat16", background=True)
    cache = ActivationCache(tmp_path)
    assert cache.dtype == torch.bfloat16
    base = torch.cat([b for b, _ in data])
    x = cache.read_rows(0, 20)
    assert torch.allclose(x[:, 0], base, rtol=2**-8, atol=0)  # bf16 keeps 8 significant bits
    assert torch.equal(x[:, 0], base.to(torch.bfloat16).to(torch.float32))  # round-to-nearest, as torch casts
    assert cache.read_rows(0, 20, dtype=torch.bfloat16).dtype == torch.bfloat16
    import pickle  # DataLoader workers / spawn get a pickled copy

    assert torch.equal(pickle.loads(pickle.dumps(cache)).read_rows(3, 17), x[3:17])


def test_tokens_table(tmp_path):
    data = _data([7, 13])
    _write(tmp_path, data)
    t = ActivationCache(tmp_path).tokens()
    assert t.column_names == ["shard", "row", "sequence", "position", "token_id", "source", "is_template", "is_assistant"]
    assert t.schema.field("shard").type == pa.int32() and t.schema.field("sequence").type == pa.int64()
    assert t.column("shard").to_pylist() == [0] * 7 + [1] * 13
    assert t.column("row").to_pylist() == list(range(7)) + list(range(13))
    want = _tokens(13, 1000)
    assert t.column("sequence").to_pylist()[7:] == want["sequence"].tolist()
    assert t.column("source").to_pylist()[7:] == want["source"]
    assert ActivationCache(tmp_path).tokens(["token_id"]).column_names == ["token_id"]
    with pytest.raises(CacheError, match="no columns"):
        ActivationCache(tmp_path).tokens(["nope"])


# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_manifest_stats_and_scales(tmp_path, dtype):
    data = _data([50, 30, 21], seed=3)
    m = _write(tmp_path, data, dtype=dtype)
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    for k, name in enumerate(("base", "chat")):
        x = torch.cat([p[k] for p in data]).to(tdt).to(torch.float64).numpy()  # the values actually stored
        np.testing.assert_allclose(m["stats"][name]["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m["stats"][name]["mean_sq_norm"], (x**2).sum(1).mean(), rtol=1e-12)
    cache = ActivationCache(tmp_path)
    s = cache.scales()
    assert s.shape == (2,) and s.dtype == torch.float32
    x = cache.read_rows(0, cache.n_tokens).double()
    normed = x / s.double().view(1, 2, 1)
    np.testing.assert_allclose((normed**2).sum(-1).mean(0).numpy(), [D, D], rtol=1e-5)


def test_reader_accepts_minimal_foreign_manifest(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, 2, 8)).astype(np.float32) for n in (4, 6)]
    _hand_cache(tmp_path, arrays)
    cache = ActivationCache(tmp_path, verify="full")
    np.testing.assert_array_equal(cache.read_rows(0, 10).numpy(), np.concatenate(arrays))
    with pytest.raises(CacheError, match="tokens.parquet is missing"):
        cache.tokens()
    assert len(list(cache.shuffled_batches(3, seed=0, buffer_rows=6))) == 3


# ---------------------------------------------------------------------------------------------- shuffling


@pytest.fixture(scope="module")
def row_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows")
    _write(path, _data([37, 50, 23, 61, 29], d=4, row_ids=True), dtype="float32")
    return ActivationCache(path)


def _ids(batches) -> list[np.ndarray]:
    return [b[:, 0, 0].numpy().astype(np.int64) for b in batches]


@pytest.mark.parametrize("B,start,stop,buf,chunk", [(8, 0, None, 40, 5), (16, 13, 190, 48, None), (5, 0, 200, 5, 1), (32, 0, None, 1000, 7)])
def test_shuffled_covers_each_row_once(row_cache, B, start, stop, buf, chunk):
    stop_ = row_cache.n_tokens if stop is None else stop
    batches = list(row_cache.shuffled_batches(B, seed=7, start=start, stop=stop, buffer_rows=buf, chunk_rows=chunk))
    assert len(batches) == (stop_ - start) // B == row_cache.batches_per_epoch(B, start=start, stop=stop)
    assert all(b.shape == (B, 2, 4) and b.dtype == torch.float32 for b in batches)
    for b in batches:  # base and chat rows stay paired
        assert torch.equal(b[:, 1, 0], -b[:, 0, 0])
    ids = np.concatenate(_ids(batches))
    assert len(np.unique(ids)) == len(ids)
    assert set(ids) <= set(range(start, stop_))
    assert len(ids) == stop_ - start - (stop_ - start) % B
    assert ids.tolist() != sorted(ids.tolist())


def test_shuffled_deterministic_and_epoch_dependent(row_cache):
    run = lambda **kw: np.concatenate(_ids(row_cache.shuffled_batches(8, buffer_rows=64, chunk_rows=4, **kw)))
    a = run(seed=1, epoch=0)
    np.testing.assert_array_equal(a, run(seed=1, epoch=0))
    assert not np.array_equal(a, run(seed=1, epoch=1))
    assert not np.array_equal(a, run(seed=2, epoch=0))


def test_shuffled_mixes_shards_within_a_batch(row_cache):
    bounds = np.cumsum([37, 50, 23, 61, 29])
    shards_per_batch = [len(np.unique(np.searchsorted(bounds, ids, side="right"))) for ids in _ids(row_cache.shuffled_batches(16, seed=0, buffer_rows=128, chunk_rows=4))]
    assert min(shards_per_batch) >= 2 and np.mean(shards_per_batch) >= 3


def test_skip_batches_equals_tail(row_cache):
    kw = dict(seed=5, epoch=2, start=3, stop=197, buffer_rows=40, chunk_rows=3)
    full = list(row_cache.shuffled_batches(8, **kw))
    for skip in range(len(full) + 1):
        for prefetch in (False, True):  # reading the next buffer on a thread changes nothing
            got = list(row_cache.shuffled_batches(8, skip_batches=skip, prefetch=prefetch, **kw))
            assert len(got) == len(full) - skip
            assert all(torch.equal(g, f) for g, f in zip(got, full[skip:]))


def test_shuffle_buffer_is_bounded(row_cache, monkeypatch):
    read = []
    orig = ActivationCache._read_planes

    def counting(self, a, b, dst):
        read.append(b - a)
        return orig(self, a, b, dst)

    monkeypatch.setattr(ActivationCache, "_read_planes", counting)  # every byte of shard data comes through here
    B, buf = 8, 44  # the buffer holds 40 rows (a multiple of B)
    for i, _ in enumerate(row_cache.shuffled_batches(B, seed=0, buffer_rows=buf, chunk_rows=3)):
        assert sum(read) <= i * B + buf  # rows read never run more than one buffer ahead of rows yielded
    read.clear()
    it = row_cache.shuffled_batches(B, seed=0, buffer_rows=buf, chunk_rows=3, skip_batches=20)
    next(it)
    assert sum(read) <= buf  # skipping does not read the skipped data
    read.clear()
    for i, _ in enumerate(row_cache.shuffled_batches(B, seed=0, buffer_rows=buf, chunk_rows=3, prefetch=True)):
        assert sum(read) <= i * B + 2 * buf  # with prefetch: at most one more buffer ahead
    with pytest.raises(ConfigError, match="buffer_rows"):
        next(row_cache.shuffled_batches(64, seed=0, buffer_rows=32))


def test_shuffle_plan_reads_each_row_once_and_orders_the_batches(row_cache):
    """The plan alone (no file read) covers the range, and the reader serves batches in its order."""
    n, B, start = 190, 8, 7
    plan = plan_shuffle(n, B, seed=3, epoch=1, buffer_rows=44, chunk_rows=6, row_bytes=16, start=start)
    assert plan.buffer_rows == 40 and plan.chunk_rows == 6 and plan.buffers == range(0, 5)
    rows = []
    for k in plan.buffers:
        pieces = list(plan.reads(k))
        assert [o for _, _, o in pieces] == np.cumsum([0] + [m for _, m, _ in pieces[:-1]]).tolist()
        assert all((g - start) % 6 + m <= 6 for g, m, _ in pieces)  # a read never crosses a chunk
        buf = np.concatenate([np.arange(g, g + m) for g, m, _ in pieces])
        assert len(buf) == plan.buffer_len(k) == min(40, n - 40 * k)
        rows.append(buf[plan.permutation(k)])
    assert sorted(np.concatenate(rows).tolist()) == list(range(start, start + n))
    want = [r[b * B : (b + 1) * B] for r in rows for b in range(len(r) // B)]
    got = _ids(row_cache.shuffled_batches(B, seed=3, epoch=1, start=start, stop=start + n, buffer_rows=44, chunk_rows=6))
    assert len(got) == len(want) == n // B == 23  # 190 = 4·40 + 30: the last buffer yields 3 batches and drops 6 rows
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    skipped = plan_shuffle(n, B, seed=3, epoch=1, buffer_rows=44, chunk_rows=6, row_bytes=16, start=start, skip_batches=12)
    assert skipped.buffers == range(2, 5) and skipped.first_batch(2) == 2 and skipped.first_batch(3) == 0
    assert plan_shuffle(n, B, seed=3, buffer_rows=44, row_bytes=16, skip_batches=n // B).buffers == range(0)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_gives_identical_manifest_and_tokens(tmp_path):
    data = _data([11, 9, 14, 6, 10], seed=1)
    _write(tmp_path / "a", data)

    b = tmp_path / "b"
    w = CacheWriter(b, d_model=D, layer=4, metadata={"models": {"base": "b", "chat": "c"}})
    for i in range(3):
        w.write_shard(i, *data[i], _tokens(len(data[i][0]), 1000 * i), background=True)
    w.close()  # "crash": a new writer object picks up from disk
    # leftovers of a crash: a truncated temp file, and shard 3 renamed into place but without its sidecar
    (b / "shards/.shard-00003.safetensors.tmp-1-deadbeef").write_bytes(b"\x00" * 100)
    w.write_shard(3, *data[3], _tokens(len(data[3][0]), 3000))
    w.close()  # a writer holds the cache's lock until it is closed (or finalized)
    full = (b / "shards/shard-00003.safetensors").read_bytes()
    (b / "shards/shard-00003.safetensors").write_bytes(full[: len(full) // 2])
    (b / "shards/shard-00003.json").unlink()

    w2 = CacheWriter(b, d_model=D, layer=4, metadata={"models": {"base": "b", "chat": "c"}})
    done = [w2.is_complete(i) for i in range(5)]
    assert done == [True, True, True, False, False]
    for i in range(5):
        if not done[i]:
            w2.write_shard(i, *data[i], _tokens(len(data[i][0]), 1000 * i))
    w2.finalize(5)
    for name in ("manifest.json", "tokens.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (b / name).read_bytes(), name
    assert not list((b / "shards").glob(".*tmp*"))  # the crashed writer's temp file is cleaned up
    assert torch.equal(ActivationCache(b, verify="full").read_rows(0, 50), ActivationCache(tmp_path / "a").read_rows(0, 50))
    # a newer code version keeps the shards; other settings (models, dtype) are refused, naming what differs
    assert CacheWriter(b, d_model=D, layer=4, metadata={"models": {"base": "b", "chat": "c"}, "code_version": "x"}).is_complete(0)
    with pytest.raises(CacheError, match=r'other settings \(models.base: "b" -> "x"\).*--overwrite'):
        CacheWriter(b, d_model=D, layer=4, metadata={"models": {"base": "x", "chat": "c"}})
    with pytest.raises(CacheError, match=r'dtype: "bfloat16" -> "float32"'):
        CacheWriter(b, d_model=D, layer=4, dtype="float32", metadata={"models": {"base": "b", "chat": "c"}})
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()  # nothing touched


def test_finalize_names_missing_shards(tmp_path):
    data = _data([5, 5, 5])
    w = CacheWriter(tmp_path, d_model=D, layer=0)
    w.write_shard(0, *data[0], _tokens(5))
    w.write_shard(2, *data[2], _tokens(5))
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        w.finalize(3)
    assert not (tmp_path / "manifest.json").exists()


def test_writer_rejects_bad_input(tmp_path):
    w = CacheWriter(tmp_path, d_model=D, layer=0)
    b, c = _data([5])[0]
    with pytest.raises(CacheError, match="5"):
        w.write_shard(0, b, c, _tokens(4))
    with pytest.raises(CacheError, match="source"):
        w.write_shard(0, b, c, {**_tokens(5), "source": ["web"] * 5})
    with pytest.raises(CacheError, match="lacks columns"):
        w.write_shard(0, b, c, {k: v for k, v in _tokens(5).items() if k != "position"})
    with pytest.raises(CacheError, match=r"\[n, 16\]"):
        w.write_shard(0, b[:, :8], c, _tokens(5))
    bad = b.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(CacheError, match="base activations hold NaN or inf"):
        w.write_shard(0, bad, c, _tokens(5))
    w.write_shard(0, b, c, _tokens(5), background=True).result()
    with pytest.raises(CacheError, match="chat activations hold NaN or inf"):  # raised from the writer thread
        w.write_shard(1, b, c * float("nan"), _tokens(5), background=True).result()
    assert w.is_complete(0) and not w.is_complete(1)
    with pytest.raises(ConfigError):
        CacheWriter(tmp_path, d_model=D, layer=0, dtype="float16")
    with pytest.raises(ConfigError, match="reserved"):
        CacheWriter(tmp_path, d_model=D, layer=0, metadata={"n_tokens": 3})


# ---------------------------------------------------------------------------------------------- corruption


def test_corrupt_shard_detected_at_read(tmp_path):
    _write(tmp_path, _data([10, 10, 10]), dtype="float32")
    f = tmp_path / "shards/shard-00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="shard-00001.safetensors.*corrupt.*re-run"):
        ActivationCache(tmp_path, verify="full")
    lazy = ActivationCache(tmp_path, verify="lazy")
    lazy.read_rows(0, 10)  # shard 0 is fine
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        lazy.read_rows(5, 15)
    for prefetch in (False, True):  # an error on the prefetch thread reaches the caller too
        with pytest.raises(CacheError, match="shard-00001.safetensors"):
            list(lazy.shuffled_batches(5, seed=0, buffer_rows=30, prefetch=prefetch))
    assert ActivationCache(tmp_path, verify="none").read_rows(10, 20).shape == (10, 2, D)
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 30])  # truncated: caught from the header, even without hashing
    with pytest.raises(CacheError, match="shard-00001.safetensors is truncated"):
        ActivationCache(tmp_path, verify="none")
    assert not CacheWriter(tmp_path, d_model=D, layer=4, dtype="float32", metadata={"models": {"base": "b", "chat": "c"}}).is_complete(1)


def test_missing_pieces(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        ActivationCache(tmp_path / "nope")
    _write(tmp_path, _data([10, 10]))
    (tmp_path / "tokens.parquet").unlink()
    cache = ActivationCache(tmp_path)
    with pytest.raises(CacheError, match="tokens.parquet"):
        cache.tokens()
    assert cache.read_rows(0, 20).shape == (20, 2, D)  # activations still read fine
    (tmp_path / "shards/shard-00001.safetensors").unlink()
    with pytest.raises(CacheError, match="shard-00001.safetensors is missing"):
        ActivationCache(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        ActivationCache(tmp_path)


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, torch.float32])
def test_wrong_tensor_dtype(tmp_path, bad):
    rng = np.random.default_rng(0)
    _hand_cache(tmp_path, [rng.normal(size=(6, 2, 8)).astype(np.float32)], dtype=torch.bfloat16)
    f = tmp_path / "shards/shard-00000.safetensors"
    save_file({"base": torch.zeros(6, 8, dtype=bad), "chat": torch.zeros(6, 8, dtype=bad)}, f)
    with pytest.raises(CacheError, match=r"shard-00000.safetensors stores 'base' as (F16|I32|F32).*delete it and re-run"):
        ActivationCache(tmp_path, verify="none")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.pop("stats"), "lacks required keys"),
        (lambda m: m.update(n_tokens=11), "sum to 10"),
        (lambda m: m["shards"][0].update(rows=5), "sum to 5"),
        (lambda m: m.update(dtype="float16"), "not supported"),
        (lambda m: m.update(n_tokens=0, shards=[{**m["shards"][0], "rows": 0}]), "empty"),
    ],
)
def test_bad_manifest(tmp_path, edit, match):
    rng = np.random.default_rng(0)
    _hand_cache(tmp_path, [rng.normal(size=(10, 2, 8)).astype(np.float32)])
    m = json.loads((tmp_path / "manifest.json").read_text())
    edit(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=match):
        ActivationCache(tmp_path)


def test_shard_rows_mismatch_with_manifest(tmp_path):
    rng = np.random.default_rng(0)
    _hand_cache(tmp_path, [rng.normal(size=(6, 2, 8)).astype(np.float32), rng.normal(size=(4, 2, 8)).astype(np.float32)])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["rows"], m["shards"][1]["rows"] = 5, 5
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"shard-00000.safetensors has 'base' of shape \[6, 8\]"):
        ActivationCache(tmp_path)


def test_manifest_hash_is_sha256_of_bytes(tmp_path):
    _write(tmp_path, _data([4]))
    assert ActivationCache(tmp_path).manifest_hash == hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert os.path.exists(tmp_path / "tokens.parquet")


def test_cli_cache_info(tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    data = _data([7, 13])
    _write(tmp_path, data)
    res = CliRunner().invoke(app, ["cache-info", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    sources = _tokens(7)["source"] + _tokens(13, 1000)["source"]
    assert info["n_tokens"] == 20 and info["shards"] == 2 and info["checksums"] == "verified"
    assert info["tokens"]["by_source"] == {s: sources.count(s) for s in set(sources)}
    assert info["metadata"]["models"] == {"base": "b", "chat": "c"}
    f = tmp_path / "shards/shard-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    res = CliRunner().invoke(app, ["cache-info", "--cache", str(tmp_path)])
    assert res.exit_code == 2 and "shard-00000.safetensors" in res.output and "corrupt" in res.output


# ---------------------------------------------------------------------------------------------- one writer, own files, finite values

META = {"models": {"base": "b", "chat": "c"}}


def test_slices_write_at_once_and_a_merge_equals_one_writer(tmp_path):
    data = _data([5, 7, 6, 4], seed=3)
    whole = _write(tmp_path / "whole", data)
    out = tmp_path / "sliced"
    slices = [CacheWriter(out, d_model=D, layer=4, metadata=META, shards=s) for s in ([0, 2], [1, 3])]  # both held
    for w, idx in zip(slices, ([0, 2], [1, 3])):
        for i in idx:
            w.write_shard(i, *data[i], _tokens(len(data[i][0]), 1000 * i))
    with pytest.raises(CacheError, match=r"(?=.*slice writer of shards \[0, 2\])(?=.*slice writer of shards \[1, 3\])"):
        CacheWriter(out, d_model=D, layer=4, metadata=META)  # the merge waits for every slice
    with pytest.raises(ConfigError, match="cannot finalize"):
        slices[0].finalize(4)
    for w in slices:
        w.close()
    assert CacheWriter(out, d_model=D, layer=4, metadata=META).finalize(4) == whole
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    assert not list(out.glob(".crossdiff-lock*"))  # a clean finish leaves no lock file


HOLD_AND_DIE = """
import os, sys
from crossdiff_core.cache import CacheWriter
CacheWriter(sys.argv[1], d_model=16, layer=4, metadata={"models": {"base": "b", "chat": "c"}})
os._exit(9)  # killed while holding the lock: no cleanup at all
"""


def test_a_dead_writers_lock_file_does_not_block(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 9, proc.stderr
    lock = tmp_path / ".crossdiff-lock"
    assert json.loads(lock.read_text())["pid"] != os.getpid()  # the dead holder's record stays behind
    w = CacheWriter(tmp_path, d_model=D, layer=4, metadata=META)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    w.write_shard(0, *_data([5])[0], _tokens(5))
    w.finalize(1)
    assert not lock.exists()


def test_lock_is_released_by_close_and_taken_again_by_a_write(tmp_path):
    data = _data([5, 5])
    with CacheWriter(tmp_path, d_model=D, layer=4, metadata=META) as w:
        w.write_shard(0, *data[0], _tokens(5))
    assert not (tmp_path / ".crossdiff-lock").exists()
    other = CacheWriter(tmp_path, d_model=D, layer=4, metadata=META)  # free again
    with pytest.raises(CacheError, match="being written by cache writer"):
        w.write_shard(1, *data[1], _tokens(5))  # the closed writer must take the lock again, and cannot
    other.close()
    w.write_shard(1, *data[1], _tokens(5))
    assert w.finalize(2)["n_tokens"] == 10
    with pytest.raises(CacheError, match="being written"):  # readers ignore the lock; writers do not
        held = CacheWriter(tmp_path, d_model=D, layer=4, metadata=META)
        assert ActivationCache(tmp_path).n_tokens == 10
        CacheWriter(tmp_path, d_model=D, layer=4, metadata=META)
    held.close()


def test_symlinks_inside_the_cache_are_followed(tmp_path):
    _write(tmp_path, _data([4, 6]))
    f = tmp_path / "shards/shard-00001.safetensors"
    (tmp_path / "store").mkdir()
    f.rename(tmp_path / "store/one.safetensors")
    f.symlink_to(Path("../store/one.safetensors"))  # relative, and still inside the cache
    assert ActivationCache(tmp_path, verify="full").read_rows(0, 10).shape == (10, 2, D)


def test_writer_replaces_fifos_left_where_its_files_go(tmp_path):
    data = _data([5, 5])
    _write(tmp_path, data)
    for name in ("shards/shard-00000.safetensors", "shards/shard-00001.json"):
        (tmp_path / name).unlink()
        os.mkfifo(tmp_path / name)
    w = CacheWriter(tmp_path, d_model=D, layer=4, metadata=META)
    assert [w.is_complete(i) for i in range(2)] == [False, False]  # never blocks on a FIFO
    for i in range(2):
        w.write_shard(i, *data[i], _tokens(5, 1000 * i))
    w.finalize(2)
    assert ActivationCache(tmp_path, verify="full").read_rows(0, 10).shape == (10, 2, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_counts_match_torch(tmp_path, dtype):
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=(n, 2, 8)).astype(np.float32) for n in (300, 17, 64)]
    arrays[0][[3, 3, 250], 1, [0, 5, 7]] = [np.nan, np.inf, -np.inf]
    arrays[2][63, 0, :] = np.nan
    stats_source = [np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) for a in arrays]
    _hand_cache(tmp_path, arrays, dtype=dtype)
    m = json.loads((tmp_path / "manifest.json").read_text())  # finite stats, as a careless tool might write
    allx = np.concatenate(stats_source).astype(np.float64)
    for k, name in enumerate(("base", "chat")):
        m["stats"][name] = {"mean": allx[:, k].mean(0).tolist(), "mean_sq_norm": float((allx[:, k] ** 2).sum(1).mean())}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    cache = ActivationCache(tmp_path)
    rows = cache.read_rows(0, cache.n_tokens)  # [n, 2, d]
    bad = ~torch.isfinite(rows)
    want = []
    for i, (lo, hi) in enumerate([(0, 300), (300, 317), (317, 381)]):
        for k, model in enumerate(("base", "chat")):
            b = bad[lo:hi, k]
            if b.any():
                want.append({"file": f"shards/shard-{i:05d}.safetensors", "model": model, "count": int(b.sum()),
                             "first_row": int(b.any(dim=1).nonzero()[0])})
    assert cache.nonfinite() == want and len(want) == 2
    with pytest.raises(CacheError, match=r"shard-00000.safetensors \(chat: 3 values, first in row 3\); shards/shard-00002"):
        cache.check_finite()
    clean = tmp_path / "clean"
    _write(clean, _data([7, 9]))
    assert ActivationCache(clean).nonfinite() == [] and ActivationCache(clean).check_finite() is None
