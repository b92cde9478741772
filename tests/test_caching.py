"""The caching driver and `crossdiff cache` (crossdiff_core.caching)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff_core.cache import ActivationCache
from crossdiff_core.caching import cache_activations, plan_shards, run_cache, shard_slice
from crossdiff_core.data import DataConfig, build_corpus
from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.models import load_pair
from tests.test_models import make_pair_dirs

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachedata")
    rng = np.random.default_rng(0)
    words = ["the", "user", "asked", "a", "question", "about", "weather", "sunny", "world", "hello", "é"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(30)]
    pd.DataFrame({"text": texts}).to_parquet(root / "text.parquet")
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(20):
            conv = [{"role": "user", "content": " ".join(rng.choice(words, size=rng.integers(1, 6)))},
                    {"role": "assistant", "content": " ".join(rng.choice(words, size=rng.integers(1, 8)))}]
            f.write(json.dumps({"messages": conv}) + "\n")
    return root


def _config(files, n_tokens=1200):
    return DataConfig(text=str(files / "text.parquet"), chats=str(files / "chats.jsonl"), n_tokens=n_tokens,
                      max_length=64, text_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    base, chat, _ = make_pair_dirs(tmp_path_factory.mktemp("models"), "llama")
    return load_pair(base, chat, layer=LAYER, dtype="float32")


def test_plan_shards_hand_computed():
    plans = plan_shards([3, 5, 2, 7, 1], 6)
    assert [(p.index, p.start, p.stop, p.rows) for p in plans] == [(0, 0, 2, 8), (1, 2, 4, 9), (2, 4, 5, 1)]
    assert [(p.start, p.stop, p.rows) for p in plan_shards([6, 6], 6)] == [(0, 1, 6), (1, 2, 6)]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cached_activations_equal_output_hidden_states(tmp_path, data_files, arch):
    base_dir, chat_dir, _ = make_pair_dirs(tmp_path, arch)
    pair = load_pair(base_dir, chat_dir, layer=LAYER, dtype="float32")
    corpus = build_corpus(pair.tokenizer, _config(data_files, 600))
    run = cache_activations(pair, corpus, tmp_path / "cache", batch_size=4, shard_tokens=150, progress=False)
    assert len(run.computed) == len(run.manifest["shards"]) >= 4 and run.skipped == []

    cache = ActivationCache(tmp_path / "cache", verify="full")
    tokens = cache.tokens().to_pandas()
    rows = cache.read_rows(0, cache.n_tokens, dtype=torch.bfloat16)  # [n, 2, d]
    assert cache.n_tokens == len(tokens) == 600 and cache.layer == LAYER and cache.d_model == 32
    for s, seq in enumerate(corpus.sequences):
        mine = np.flatnonzero(tokens["sequence"].to_numpy() == s)
        ids = torch.from_numpy(seq.token_ids)[None]
        positions = np.flatnonzero(seq.cached)
        np.testing.assert_array_equal(tokens["position"].to_numpy()[mine], positions)
        np.testing.assert_array_equal(tokens["token_id"].to_numpy()[mine], seq.token_ids[positions])
        assert (tokens["source"].to_numpy()[mine] == seq.source).all()
        assert seq.token_ids[0] == pair.tokenizer.bos_token_id and positions[0] == 1  # BOS never cached
        for m, model in enumerate((pair.base, pair.chat)):  # unpadded, full forward, one sequence at a time
            with torch.no_grad():
                ref = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0, positions]
            torch.testing.assert_close(rows[mine, m], ref.to(torch.bfloat16))
    # the padding id never reaches the cache, and every chat's template mask is stored
    assert (tokens["token_id"] != pair.tokenizer.pad_token_id).all()
    assert tokens.loc[tokens["source"] == "chat", "is_template"].any()
    assert not tokens.loc[tokens["source"] == "text", ["is_template", "is_assistant"]].to_numpy().any()


def test_manifest_metadata(tmp_path, data_files, llama_pair):
    corpus = build_corpus(llama_pair.tokenizer, _config(data_files, 300))
    m = cache_activations(llama_pair, corpus, tmp_path / "c", shard_tokens=100, progress=False).manifest
    assert m["layer"] == LAYER and m["d_model"] == 32 and m["n_tokens"] == 300 and m["dtype"] == "bfloat16"
    assert m["models"]["base"] == llama_pair.base_name and m["models"]["chat"] == llama_pair.chat_name
    assert m["chat_template"] == llama_pair.tokenizer.chat_template and len(m["tokenizer_hash"]) == 64
    assert [s["source"] for s in m["data"]["sources"]] == [str(data_files / "text.parquet"),
                                                          str(data_files / "chats.jsonl")]
    assert m["data"]["tokens"] == {"text": 150, "chat": 150}
    assert "crossdiff" in m["code_version"] and m["cache"]["shard_tokens"] == 100


def test_interrupted_run_resumes_to_the_same_cache(tmp_path, data_files, llama_pair):
    corpus = build_corpus(llama_pair.tokenizer, _config(data_files))
    kw = dict(batch_size=3, shard_tokens=200, progress=False)
    full = cache_activations(llama_pair, corpus, tmp_path / "full", **kw)
    n_shards = len(full.manifest["shards"])
    assert n_shards >= 5

    class Killed(Exception):
        pass

    def kill_after_2(i):
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        cache_activations(llama_pair, corpus, tmp_path / "resumed", on_shard=kill_after_2, **kw)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    shard0 = tmp_path / "resumed" / full.manifest["shards"][0]["file"]
    mtime0 = shard0.stat().st_mtime_ns

    resumed = cache_activations(llama_pair, corpus, tmp_path / "resumed", **kw)
    assert resumed.skipped == [0, 1, 2] and resumed.computed == list(range(3, n_shards))
    assert shard0.stat().st_mtime_ns == mtime0  # not rewritten
    assert resumed.manifest == full.manifest
    for name in ("manifest.json", "tokens.parquet"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()

    again = cache_activations(llama_pair, corpus, tmp_path / "resumed", **kw)  # nothing left to do
    assert again.computed == [] and again.manifest == full.manifest


KILL_SCRIPT = """
import os, sys
import torch
torch.set_num_threads(1)
from crossdiff_core.caching import cache_activations
from crossdiff_core.data import DataConfig, build_corpus
from crossdiff_core.errors import CacheError, ConfigError
from crossdiff_core.models import load_pair
base, chat, out, text, chats = sys.argv[1:]
pair = load_pair(base, chat, layer=1, dtype="float32")
corpus = build_corpus(pair.tokenizer, DataConfig(text=text, chats=chats, n_tokens=1200, max_length=64, seed=0))
def die(i):
    if i == 2:
        os._exit(9)  # like SIGKILL: no cleanup, background writes die mid-flight
cache_activations(pair, corpus, out, batch_size=3, shard_tokens=200, progress=False, on_shard=die)
"""


def test_slices_into_one_directory_then_merge(tmp_path, data_files, llama_pair):
    assert shard_slice(7, 1, 3) == [1, 4] and shard_slice(2, 2, 3) == []
    with pytest.raises(ConfigError, match="slice 3"):
        shard_slice(7, 3, 3)
    corpus = build_corpus(llama_pair.tokenizer, _config(data_files))
    kw = dict(batch_size=3, shard_tokens=200, progress=False)
    full = cache_activations(llama_pair, corpus, tmp_path / "full", **kw)
    n = len(full.manifest["shards"])
    out = tmp_path / "sliced"
    first = cache_activations(llama_pair, corpus, out, shards=shard_slice(n, 0, 2), finalize=False, **kw)
    assert first.computed == list(range(0, n, 2)) and first.manifest == {}
    with pytest.raises(CacheError, match="missing or incomplete"):  # slice 1 not done yet
        cache_activations(llama_pair, corpus, out, shards=[], **kw)
    cache_activations(llama_pair, corpus, out, shards=shard_slice(n, 1, 2), finalize=False, **kw)
    merged = cache_activations(llama_pair, corpus, out, shards=[], **kw)
    assert merged.computed == [] and merged.manifest == full.manifest
    with pytest.raises(ConfigError, match="outside the plan"):
        cache_activations(llama_pair, corpus, out, shards=[n], **kw)


def test_run_cache_slices_then_merge_equal_one_whole_run(tmp_path, data_files):
    """What the cache tasks run: `run_cache` per slice, then the merge, from model paths alone."""
    base_dir, chat_dir, _ = make_pair_dirs(tmp_path, "llama")
    kw = dict(layer=LAYER, dtype="float32", batch_size=3, shard_tokens=200, progress=False)
    whole = run_cache(base_dir, chat_dir, tmp_path / "whole", _config(data_files), **kw)
    n = len(whole.manifest["shards"])
    out = tmp_path / "sliced"
    parts = [run_cache(base_dir, chat_dir, out, _config(data_files), part=(i, 2), **kw) for i in range(2)]
    assert [p.computed for p in parts] == [list(range(0, n, 2)), list(range(1, n, 2))]
    assert all(p.manifest == {} for p in parts) and not (out / "manifest.json").exists()
    merged = run_cache(base_dir, chat_dir, out, _config(data_files), part="merge", **kw)
    assert merged.computed == [] and merged.skipped == [] and merged.manifest == whole.manifest
    for name in ("manifest.json", "tokens.parquet"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    for bad in ("slice", (2, 2), [0, 2]):  # refused before any model loads (the paths do not exist)
        with pytest.raises(ConfigError):
            run_cache(str(tmp_path / "no-base"), str(tmp_path / "no-chat"), out, _config(data_files), part=bad, **kw)


def test_hard_killed_process_resumes_to_the_same_cache(tmp_path, data_files, llama_pair):
    import subprocess
    import sys

    kw = dict(batch_size=3, shard_tokens=200, progress=False)
    corpus = build_corpus(llama_pair.tokenizer, _config(data_files))
    full = cache_activations(llama_pair, corpus, tmp_path / "full", **kw)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, llama_pair.base_name, llama_pair.chat_name, str(out),
                           str(data_files / "text.parquet"), str(data_files / "chats.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert not (out / "manifest.json").exists()
    resumed = cache_activations(llama_pair, corpus, out, **kw)
    # shard 0 was certainly finished (at most 2 writes are in flight); the others may or may not be
    n_shards = len(full.manifest["shards"])
    assert resumed.skipped[:1] == [0] and sorted(resumed.skipped + resumed.computed) == list(range(n_shards))
    assert (out / "manifest.json").read_bytes() == (tmp_path / "full" / "manifest.json").read_bytes()
    assert (out / "tokens.parquet").read_bytes() == (tmp_path / "full" / "tokens.parquet").read_bytes()


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changed_settings_are_refused_unless_overwrite(tmp_path, data_files, llama_pair):
    corpus = build_corpus(llama_pair.tokenizer, _config(data_files, 300))
    out = tmp_path / "c"
    first = cache_activations(llama_pair, corpus, out, shard_tokens=50, progress=False)
    before = _files(out)
    other = build_corpus(llama_pair.tokenizer, DataConfig(**{**_config(data_files, 300).to_dict(), "seed": 1}))
    with pytest.raises(CacheError, match=r"other settings \(.*data.config.seed: 0 -> 1.*--overwrite"):
        cache_activations(llama_pair, other, out, shard_tokens=50, progress=False)
    with pytest.raises(CacheError, match=r"cache.shard_tokens: 50 -> 100"):
        cache_activations(llama_pair, corpus, out, shard_tokens=100, progress=False)
    assert _files(out) == before  # refused before anything was touched
    again = cache_activations(llama_pair, corpus, out, shard_tokens=50, progress=False)  # same settings: resumes
    assert again.computed == [] and again.manifest == first.manifest
    with pytest.raises(ConfigError, match="whole caching run"):
        cache_activations(llama_pair, other, out, shard_tokens=100, progress=False, shards=[0], finalize=False,
                          overwrite=True)

    run = cache_activations(llama_pair, other, out, shard_tokens=100, progress=False, overwrite=True)
    assert run.skipped == [] and run.manifest["data"]["config"]["seed"] == 1
    n = len(run.manifest["shards"])
    assert n < len(first.manifest["shards"])
    # no stale shard of the old cache is left: exactly the new plan's files, equal to a fresh run's
    fresh = cache_activations(llama_pair, other, tmp_path / "fresh", shard_tokens=100, progress=False)
    names = lambda root: sorted(p.name for p in (root / "shards").iterdir())  # noqa: E731
    assert names(out) == names(tmp_path / "fresh") and len([f for f in names(out) if f.endswith(".safetensors")]) == n
    assert (out / "manifest.json").read_bytes() == (tmp_path / "fresh" / "manifest.json").read_bytes()


def test_cli_cache(tmp_path, data_files):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    base_dir, chat_dir, _ = make_pair_dirs(tmp_path, "llama")
    out = tmp_path / "cli-cache"
    result = CliRunner().invoke(app, [
        "cache", "--base", base_dir, "--chat", chat_dir, "--layer", "2", "--out", str(out),
        "--text", str(data_files / "text.parquet"), "--chats", str(data_files / "chats.jsonl"),
        "--tokens", "400", "--max-length", "32", "--dtype", "float32", "--text-fraction", "0.25",
        "--batch-size", "4", "--shard-tokens", "128", "--no-progress"])
    assert result.exit_code == 0, result.output
    cache = ActivationCache(out)
    assert cache.n_tokens == 400 and cache.layer == 2
    assert cache.manifest["data"]["tokens"] == {"text": 100, "chat": 300}
    summary = json.loads(result.stdout)
    assert summary["n_tokens"] == 400 and summary["computed"] == summary["shards"] >= 3

    args = ["cache", "--base", base_dir, "--chat", chat_dir, "--out", str(out), "--text", str(data_files / "text.parquet"),
            "--chats", str(data_files / "chats.jsonl"), "--tokens", "400", "--max-length", "32", "--dtype", "float32",
            "--text-fraction", "0.25", "--batch-size", "4", "--shard-tokens", "128", "--no-progress"]
    manifest = (out / "manifest.json").read_bytes()
    refused = CliRunner().invoke(app, [*args, "--layer", "1"])
    assert refused.exit_code == 2 and "layer: 2 -> 1" in refused.output and "--overwrite" in refused.output
    assert "Traceback" not in refused.output and (out / "manifest.json").read_bytes() == manifest
    replaced = CliRunner().invoke(app, [*args, "--layer", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert ActivationCache(out).layer == 1 and json.loads(replaced.stdout)["skipped"] == 0

    bad = CliRunner().invoke(app, ["cache", "--base", base_dir, "--chat", chat_dir, "--layer", "9", "--out",
                                   str(tmp_path / "x"), "--text", str(data_files / "text.parquet")])
    assert bad.exit_code != 0 and "layer 9 does not exist" in bad.output


def test_several_layers_from_one_forward_pass_equal_single_layer_runs(tmp_path, data_files, llama_pair):
    """``layers=[0, 2]``: one cache per layer under ``layer-L/``, each byte-equal to a single-layer run's,
    from one forward pass per model and batch (counted with a hook on the embedding)."""
    from dataclasses import replace

    from crossdiff_core.caching import layer_dirs

    corpus = build_corpus(llama_pair.tokenizer, _config(data_files, 500))
    kw = dict(batch_size=4, shard_tokens=150, progress=False)
    calls = {"base": 0, "chat": 0}
    hooks = [getattr(llama_pair, m).get_input_embeddings().register_forward_hook(
        lambda *_, m=m: calls.__setitem__(m, calls[m] + 1)) for m in calls]
    try:
        multi = cache_activations(llama_pair, corpus, tmp_path / "multi", layers=[2, 0], **kw)
    finally:
        for h in hooks:
            h.remove()
    n_batches = sum(-(-len(corpus.sequences[p_.start:p_.stop]) // 4) for p_ in plan_shards(
        [s.n_cached for s in corpus.sequences], 150))
    assert calls == {"base": n_batches, "chat": n_batches}  # not one pass per layer
    assert layer_dirs(tmp_path / "multi", [2, 0]) == {2: tmp_path / "multi" / "layer-2", 0: tmp_path / "multi" / "layer-0"}
    assert sorted(multi.manifests) == [0, 2] and multi.manifest == multi.manifests[2]
    for L in (0, 2):
        single = cache_activations(replace(llama_pair, layer=L), corpus, tmp_path / f"single-{L}", **kw)
        got, want = _files(tmp_path / "multi" / f"layer-{L}"), _files(tmp_path / f"single-{L}")
        assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), L  # manifest, tokens, shards
        assert single.manifest == multi.manifests[L] and ActivationCache(tmp_path / "multi" / f"layer-{L}").layer == L
    # a re-run resumes every layer; a layer missing a shard gets only that shard computed
    (tmp_path / "multi" / "layer-0" / "manifest.json").unlink()
    (tmp_path / "multi" / "layer-0" / "shards" / "shard-00000.json").unlink()  # its sidecar: shard 0 incomplete
    again = cache_activations(llama_pair, corpus, tmp_path / "multi", layers=[2, 0], **kw)
    assert again.computed == [0] and again.manifests[0] == multi.manifests[0]
    with pytest.raises(ConfigError, match="twice"):
        cache_activations(llama_pair, corpus, tmp_path / "x", layers=[1, 1], **kw)


def test_resolve_layer_reads_the_locate_recommendation(tmp_path):
    from crossdiff_core.caching import CacheConfig, resolve_layer

    assert resolve_layer(3, tmp_path / "absent.json") == 3  # an int never reads the locate output
    (tmp_path / "recommended.json").write_text(json.dumps({"recommended_layer": 5, "rule": "..."}))
    assert resolve_layer("auto", tmp_path / "recommended.json") == 5
    assert CacheConfig(layer="auto").layer == "auto"
    for bad in ("two", -1, 1.5, True):
        with pytest.raises(ConfigError, match="cache.layer must be"):
            CacheConfig(layer=bad)
    with pytest.raises(ConfigError, match="run the locate stage"):
        resolve_layer("auto", tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text(json.dumps({"recommended_layer": "x"}))
    with pytest.raises(ConfigError, match="no integer recommended_layer"):
        resolve_layer("auto", tmp_path / "bad.json")


def test_cache_overwrite_task_clears_a_cache_before_the_slices(tmp_path, data_files, llama_pair):
    from tasks.caching import overwrite_cache

    corpus = build_corpus(llama_pair.tokenizer, _config(data_files, 300))
    cache_activations(llama_pair, corpus, tmp_path / "c", shard_tokens=100, progress=False)
    assert overwrite_cache.fn({"overwrite": False}, str(tmp_path / "c")) == []
    assert (tmp_path / "c" / "manifest.json").is_file()
    removed = overwrite_cache.fn({"overwrite": True}, str(tmp_path / "c"))
    assert "manifest.json" in removed and not (tmp_path / "c" / "manifest.json").exists()
    assert not list((tmp_path / "c" / "shards").glob("*.safetensors"))
    # the slices then write a cache of other settings, which was refused before
    other = build_corpus(llama_pair.tokenizer, DataConfig(**{**_config(data_files, 300).to_dict(), "seed": 1}))
    part = cache_activations(llama_pair, other, tmp_path / "c", shard_tokens=100, progress=False, shards=[0], finalize=False)
    assert part.computed == [0]


def test_cli_cache_several_layers(tmp_path, data_files):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    base_dir, chat_dir, _ = make_pair_dirs(tmp_path, "llama")
    out = tmp_path / "multi"
    args = ["cache", "--base", base_dir, "--chat", chat_dir, "--out", str(out), "--text", str(data_files / "text.parquet"),
            "--tokens", "200", "--max-length", "32", "--dtype", "float32", "--batch-size", "4", "--shard-tokens", "128",
            "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--layer", "0", "--layer", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"] == {"0": str(out / "layer-0"), "2": str(out / "layer-2")}
    assert [ActivationCache(out / f"layer-{L}").layer for L in (0, 2)] == [0, 2]
    assert not (out / "manifest.json").exists()
    r = CliRunner().invoke(app, [*args, "--layer", "0", "--layer", "9"])
    assert r.exit_code == 2 and "layer 9 does not exist" in r.output


def test_cli_synth_rerun_with_another_config_needs_overwrite(tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--n-tokens", "2000", "--d-model", "8", "--shared", "4", "--chat-only", "2",
            "--base-only", "2", "--weakly-shared", "2", "--changed", "2", "--mean-active", "1", "--no-progress"]
    assert CliRunner().invoke(app, args).exit_code == 0
    manifest = (out / "manifest.json").read_bytes()
    refused = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert (out / "manifest.json").read_bytes() == manifest
    replaced = CliRunner().invoke(app, [*args, "--seed", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert ActivationCache(out).manifest["synthetic"]["seed"] == 1
