"""Bad inputs and faults (issue 11), table-driven.

Each case builds one bad input under tmp_path, then runs the public API or the CLI on it, and the test
checks (a) a clean error: a CrossdiffError, or exit code 2 with one line `error: ...` and no traceback;
(b) that the message names the problem (a substring); (c) that no data was lost: the files under
`keep` are byte-for-byte what they were before the run. Nothing may hang: every run has a deadline.

One `*_CASES` list and one parametrized test per class of fault. To add a class, append a list of
`Case`s and a test that calls `check(case, tmp_path, stack)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from crossdiff_core.cache import ActivationCache, CacheWriter, cache_summary
from crossdiff_core.errors import CrossdiffError

REPO = Path(__file__).resolve().parents[1]
D = 8
META = {"models": {"base": "org/base", "chat": "org/chat"}, "data": {"sources": ["text.parquet"]},
        "cache": {"shard_tokens": 6}}
SETTINGS = {"d_model": D, "layer": 3, "dtype": "float32", "metadata": META}
SIZES = (6, 5, 4)


# ---------------------------------------------------------------------------------------------- the harness


@dataclass(frozen=True)
class Case:
    """`build(tmp_path, stack)` makes the bad input and returns the run (a no-argument callable); `match`
    must appear in the error message; the files under `tmp_path / keep` must not change (None: no check)."""

    id: str
    build: Callable[[Path, contextlib.ExitStack], Callable[[], Any]]
    match: str
    keep: str | None = "cache"


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (FIFOs and directories are never opened)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail instead of hanging (a FIFO opened for reading, a lock waited on)."""
    def hung(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the run hangs")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _message(run: Callable[[], Any]) -> str:
    """The error message of `run`, after checking the error is a clean one."""
    with _deadline(60):
        try:
            out = run()
        except CrossdiffError as err:
            return str(err)
    if hasattr(out, "exit_code") and hasattr(out, "output"):  # a CliRunner result
        assert out.exception is None or isinstance(out.exception, SystemExit), f"crashed: {out.exception!r}\n{out.output}"
        text = out.output
        assert out.exit_code == 2, f"exit code {out.exit_code}, want 2:\n{text}"
    elif isinstance(out, subprocess.CompletedProcess):
        text = out.stderr
        assert out.returncode == 2, f"exit code {out.returncode}, want 2:\n{out.stdout}\n{text}"
    else:
        pytest.fail(f"accepted silently (returned {out!r:.200})")
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text and len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def check(case: Case, tmp_path: Path, stack: contextlib.ExitStack) -> None:
    run = case.build(tmp_path, stack)
    before = _snapshot(tmp_path / case.keep) if case.keep else None
    msg = _message(run)
    assert case.match in msg, f"the message does not name the problem ({case.match!r}):\n{msg}"
    if case.keep:
        assert _snapshot(tmp_path / case.keep) == before, f"files under {case.keep} changed (data lost):\n{msg}"


@pytest.fixture
def stack():
    with contextlib.ExitStack() as s:
        yield s


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


# ---------------------------------------------------------------------------------------------- builders


def _acts(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) + 1, torch.randn(n, D, generator=g) * 0.5 - 1


def _tokens(n: int, seq0: int = 0) -> dict:
    pos = np.arange(n) % 3 + 1
    return {"sequence": seq0 + np.arange(n) // 3, "position": pos, "token_id": np.arange(n) % 50,
            "source": ["text"] * n, "is_template": pos == 1, "is_assistant": np.zeros(n, dtype=bool)}


def _writer(path: Path, **changes: Any) -> CacheWriter:
    return CacheWriter(path, **{**SETTINGS, **changes})


def _cache(path: Path, **changes: Any) -> Path:
    """A finished cache of SIZES rows per shard, written by CacheWriter with SETTINGS (plus `changes`)."""
    w = _writer(path, **changes)
    for i, n in enumerate(SIZES):
        w.write_shard(i, *_acts(n, i), _tokens(n, 100 * i))
    w.finalize(len(SIZES))
    return path


def _edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def _copy_out(cache: Path, tmp: Path, shard: int = 1) -> Path:
    """A byte-identical copy of a shard outside the cache (same sha256: only its place is wrong)."""
    dst = tmp / "elsewhere" / "shards" / f"shard-{shard:05d}.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes((cache / f"shards/shard-{shard:05d}.safetensors").read_bytes())
    return dst


def _set_entry(cache: Path, shard: int, file: str) -> None:
    def edit(m):
        m["shards"][shard]["file"] = file
    _edit_manifest(cache, edit)


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    return CliRunner().invoke(app, list(args))


def _bin(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true"}
    return subprocess.run([str(REPO / ".venv/bin/crossdiff"), *args], capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------------------------- 2. a cache reads only its own files


def _absolute(tmp, stack):
    cache = _cache(tmp / "cache")
    _set_entry(cache, 1, str(_copy_out(cache, tmp)))
    return lambda: ActivationCache(cache)


def _dotdot(tmp, stack):
    cache = _cache(tmp / "cache")
    _copy_out(cache, tmp)
    _set_entry(cache, 1, "../elsewhere/shards/shard-00001.safetensors")
    return lambda: ActivationCache(cache, verify="none")


def _dotdot_inside(tmp, stack):
    cache = _cache(tmp / "cache")
    _set_entry(cache, 1, "shards/../shards/shard-00001.safetensors")
    return lambda: ActivationCache(cache)


def _symlink_out(tmp, stack):
    cache = _cache(tmp / "cache")
    out = _copy_out(cache, tmp)
    _replace(cache / "shards/shard-00001.safetensors", lambda p: p.symlink_to(out))
    return lambda: ActivationCache(cache, verify="full")


def _fifo_shard(tmp, stack):
    cache = _cache(tmp / "cache")
    _replace(cache / "shards/shard-00002.safetensors", os.mkfifo)
    return lambda: ActivationCache(cache, verify="none")


def _dir_shard(tmp, stack):
    cache = _cache(tmp / "cache")
    _replace(cache / "shards/shard-00000.safetensors", lambda p: p.mkdir())
    return lambda: ActivationCache(cache)


def _fifo_manifest(tmp, stack):
    cache = _cache(tmp / "cache")
    _replace(cache / "manifest.json", os.mkfifo)
    return lambda: ActivationCache(cache)


def _symlink_manifest_out(tmp, stack):
    cache = _cache(tmp / "cache")
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere/manifest.json").write_bytes((cache / "manifest.json").read_bytes())
    _replace(cache / "manifest.json", lambda p: p.symlink_to(tmp / "elsewhere/manifest.json"))
    return lambda: ActivationCache(cache)


def _fifo_tokens(tmp, stack):
    cache = _cache(tmp / "cache")
    _replace(cache / "tokens.parquet", os.mkfifo)
    return lambda: cache_summary(cache)


def _cli_absolute(tmp, stack):
    cache = _cache(tmp / "cache")
    _set_entry(cache, 0, str(_copy_out(cache, tmp, shard=0)))
    return lambda: _cli("cache-info", "--cache", str(cache))


def _cli_fifo(tmp, stack):
    cache = _cache(tmp / "cache")
    _replace(cache / "shards/shard-00001.safetensors", os.mkfifo)
    return lambda: _cli("cache-info", "--cache", str(cache), "--no-verify")


PATH_CASES = [
    Case("absolute", _absolute, "shards[1] file '/"),
    Case("absolute-named", _absolute, "is an absolute path"),
    Case("dotdot", _dotdot, "contains '..'"),
    Case("dotdot-inside", _dotdot_inside, "'shards/../shards/shard-00001.safetensors' contains '..'"),
    Case("symlink-out", _symlink_out, "outside the cache directory"),
    Case("fifo-shard", _fifo_shard, "'shards/shard-00002.safetensors' is a FIFO, not a regular file"),
    Case("directory-shard", _dir_shard, "'shards/shard-00000.safetensors' is a directory, not a regular file"),
    Case("fifo-manifest", _fifo_manifest, "'manifest.json' is a FIFO"),
    Case("symlink-manifest-out", _symlink_manifest_out, "'manifest.json' resolves to"),
    Case("fifo-tokens", _fifo_tokens, "'tokens.parquet' is a FIFO"),
    Case("cli-absolute", _cli_absolute, "is an absolute path"),
    Case("cli-fifo", _cli_fifo, "is a FIFO"),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=_ids(PATH_CASES))
def test_a_cache_reads_only_its_own_files(case, tmp_path, stack):
    check(case, tmp_path, stack)


# ---------------------------------------------------------------------------------------------- 3a. one writer per cache

HOLD = """
import sys
from crossdiff_core.cache import CacheWriter
w = CacheWriter(sys.argv[1], d_model=8, layer=3, dtype="float32", metadata=__import__("json").loads(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def _hold_elsewhere(path: Path, stack: contextlib.ExitStack) -> subprocess.Popen:
    """A second process holding `path`'s writer lock until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), json.dumps(META)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop():
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready and proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.poll() is not None else "no answer"
    return proc


def _hold_here(path: Path, stack: contextlib.ExitStack, **changes: Any) -> CacheWriter:
    w = _writer(path, **changes)
    stack.callback(w.close)
    return w


def _second_writer_here(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack)
    return lambda: _writer(tmp / "cache")


def _holder_pid_named(tmp, stack):
    proc = _hold_elsewhere(_cache(tmp / "cache"), stack)
    run = lambda: _writer(tmp / "cache")  # noqa: E731

    def named():
        try:
            run()
        except CrossdiffError as err:
            assert f"pid {proc.pid} on host" in str(err), str(err)
            raise
    return named


def _overwrite_while_held(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack)
    return lambda: _writer(tmp / "cache", layer=5, overwrite=True)  # must not clear what the holder writes


def _whole_while_slice(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack, shards=[0, 2])
    return lambda: _writer(tmp / "cache")


def _same_slice_twice(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack, shards=[1])
    _hold_here(tmp / "cache", stack, shards=[0, 2])  # another slice runs alongside: fine
    return lambda: _writer(tmp / "cache", shards=[1])


def _slice_while_whole(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack)
    return lambda: _writer(tmp / "cache", shards=[1])


WRITER_CASES = [
    Case("second-writer-same-process", _second_writer_here, f"cache writer (pid {os.getpid()} on host"),
    Case("second-writer-other-process", _holder_pid_named, "one writer per cache; wait for it to finish"),
    Case("overwrite-while-held", _overwrite_while_held, "is being written by cache writer"),
    Case("whole-writer-while-a-slice-runs", _whole_while_slice, "slice writer of shards [0, 2]"),
    Case("same-slice-twice", _same_slice_twice, "is being written by slice writer of shards [1] (pid"),
    Case("slice-while-whole-writer", _slice_while_whole, "is being written by cache writer (pid"),
]


@pytest.mark.parametrize("case", WRITER_CASES, ids=_ids(WRITER_CASES))
def test_one_writer_per_cache(case, tmp_path, stack):
    check(case, tmp_path, stack)


# ---------------------------------------------------------------------------------------------- 3b. no silent overwrite


def _rerun(**changes: Any):
    def build(tmp, stack):
        _cache(tmp / "cache")
        return lambda: _writer(tmp / "cache", **changes)
    return build


def _rerun_meta(path: tuple[str, ...], value: Any):
    meta = json.loads(json.dumps(META))
    d = meta
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return _rerun(metadata=meta)


def _foreign(tmp, stack):
    """A cache another tool wrote: no sidecars, no settings record, only the manifest says what it is."""
    cache = _cache(tmp / "cache")
    for f in (cache / "shards").glob("*.json"):
        f.unlink()
    for f in (cache / "shards").glob("*.tokens.parquet"):
        f.unlink()
    return lambda: _writer(cache, layer=7)


def _unfinished(tmp, stack):
    """Slices ran, the merge did not: only the record and the sidecars say which settings wrote it."""
    cache = _cache(tmp / "cache")
    (cache / "manifest.json").unlink()
    (cache / "tokens.parquet").unlink()
    return lambda: _writer(cache, dtype="bfloat16")


def _legacy(tmp, stack):
    """Shards from an older writer: sidecars only (no settings record, no manifest)."""
    cache = _cache(tmp / "cache")
    for name in ("manifest.json", "tokens.parquet", "shards/settings.json"):
        (cache / name).unlink()
    return lambda: _writer(cache, layer=4)


def _slice_other_settings(tmp, stack):
    _hold_here(_cache(tmp / "cache"), stack, shards=[0])
    return lambda: _writer(tmp / "cache", shards=[1], metadata={**META, "models": {"base": "x", "chat": "y"}})


SETTINGS_CASES = [
    Case("layer", _rerun(layer=4), "layer: 3 -> 4"),
    Case("dtype", _rerun(dtype="bfloat16"), 'dtype: "float32" -> "bfloat16"'),
    Case("d_model", _rerun(d_model=16), "d_model: 8 -> 16"),
    Case("shard_tokens", _rerun_meta(("cache", "shard_tokens"), 12), "cache.shard_tokens: 6 -> 12"),
    Case("data", _rerun_meta(("data", "sources"), ["other.parquet"]), 'data.sources: ["text.parquet"] -> ["other.parquet"]'),
    Case("models", _rerun_meta(("models", "chat"), "org/other"), 'models.chat: "org/chat" -> "org/other"'),
    Case("names-the-fix", _rerun(layer=4), "pass --overwrite"),
    Case("foreign-cache", _foreign, "layer: 3 -> 7"),
    Case("unfinished-cache", _unfinished, 'dtype: "float32" -> "bfloat16"'),
    Case("legacy-sidecars", _legacy, "shards/shard-00000.json was written under settings"),
    Case("slice-with-other-settings", _slice_other_settings, 'models.base: "org/base" -> "x"'),
]


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=_ids(SETTINGS_CASES))
def test_other_settings_are_refused(case, tmp_path, stack):
    check(case, tmp_path, stack)


@pytest.mark.parametrize("changes", [{"layer": 4}, {"dtype": "bfloat16"}, {"metadata": {**META, "cache": {"shard_tokens": 12}}}],
                         ids=["layer", "dtype", "shard_tokens"])
def test_overwrite_clears_the_old_cache(tmp_path, changes):
    cache = _cache(tmp_path / "cache")
    (cache / "notes.txt").write_text("mine")  # not a cache file: kept
    outside = _copy_out(cache, tmp_path, shard=2)
    _edit_manifest(cache, lambda m: m["shards"].append({"file": str(outside), "rows": 0, "sha256": "0"}))
    w = _writer(cache, overwrite=True, **changes)
    assert not (cache / "manifest.json").exists() and not list((cache / "shards").glob("shard-*"))
    w.write_shard(0, *_acts(4, 9), _tokens(4))
    m = w.finalize(1)
    assert sorted(p.name for p in (cache / "shards").iterdir()) == [
        "settings.json", "shard-00000.json", "shard-00000.safetensors", "shard-00000.tokens.parquet"]  # no stale shard
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "notes.txt", "shards", "tokens.parquet"]
    assert outside.exists()  # a file outside the cache is never deleted, even if its manifest lists it
    assert m["n_tokens"] == 4 and ActivationCache(cache, verify="full").read_rows(0, 4).shape == (4, 2, D)
    assert _writer(cache, **changes).is_complete(0)  # the new settings resume; the old ones are refused now
    with pytest.raises(CrossdiffError, match="other settings"):
        _writer(cache)


# ---------------------------------------------------------------------------------------------- 5. non-finite values never pass


def _write_bad(values: Callable[[torch.Tensor, torch.Tensor], None], *, model_dtype: str = "float32",
               background: bool = False):
    """A finished cache; a same-settings writer then re-writes shard 1 with `values` applied (refused)."""
    def build(tmp, stack):
        cache = _cache(tmp / "cache", dtype=model_dtype)
        base, chat = _acts(SIZES[1], 1)
        values(base, chat)

        def run():
            w = _writer(cache, dtype=model_dtype)
            try:
                w.write_shard(1, base, chat, _tokens(SIZES[1], 100), background=background)
                w.finalize(len(SIZES))
            finally:
                w.close()
        return run
    return build


def _nan_base(b, c):
    b[2, 3] = float("nan")


def _inf_cancel(b, c):
    c[1, 0], c[3, 0] = float("inf"), float("-inf")  # the column mean would be NaN, the sum of squares inf


def _bf16_overflow(b, c):
    b[0, :] = 3.4e38  # finite in float32, rounds to inf in bfloat16


def _foreign_nonfinite(dtype: torch.dtype, model: int, values: list[float]):
    """A cache rewritten by another tool: shard 1 holds NaN/inf, with a correct sha256 and finite stats."""
    def build(tmp, stack):
        cache = _cache(tmp / "cache", dtype="float32" if dtype == torch.float32 else "bfloat16")
        f = cache / "shards/shard-00001.safetensors"
        base, chat = _acts(SIZES[1], 1)
        for i, v in enumerate(values):
            (base, chat)[model][i + 1, i] = v
        save_file({"base": base.to(dtype).contiguous(), "chat": chat.to(dtype).contiguous()}, f)
        _edit_manifest(cache, lambda m: m["shards"][1].update(sha256=hashlib.sha256(f.read_bytes()).hexdigest()))
        return cache
    return build


def _info(build, *args: str):
    def b(tmp, stack):
        cache = build(tmp, stack)
        return lambda: _cli("cache-info", "--cache", str(cache), *args)
    return b


def _info_bin(build):
    def b(tmp, stack):
        cache = build(tmp, stack)
        return lambda: _bin("cache-info", "--cache", str(cache))
    return b


def _api(build, call: Callable[[Path], Any]):
    def b(tmp, stack):
        cache = build(tmp, stack)
        return lambda: call(cache)
    return b


def _stats_nan(tmp, stack):
    cache = _cache(tmp / "cache")
    _edit_manifest(cache, lambda m: m["stats"]["chat"]["mean"].__setitem__(2, float("nan")))
    return lambda: ActivationCache(cache)


NAN_F32 = _foreign_nonfinite(torch.float32, 0, [float("nan")])
INF_BF16 = _foreign_nonfinite(torch.bfloat16, 1, [float("inf"), float("-inf")])

NONFINITE_CASES = [
    Case("writer-nan", _write_bad(_nan_base), "shard 1 (shards/shard-00001.safetensors): the base activations hold NaN or inf"),
    Case("writer-nan-background", _write_bad(_nan_base, background=True), "the base activations hold NaN or inf (1 values"),
    Case("writer-inf-cancel", _write_bad(_inf_cancel), "the chat activations hold NaN or inf (2 values in 2 rows, first row 1"),
    Case("writer-bf16-overflow", _write_bad(_bf16_overflow, model_dtype="bfloat16"), "if bfloat16 overflowed, cache in float32"),
    Case("cache-info-nan", _info(NAN_F32), "shards/shard-00001.safetensors (base: 1 values, first in row 1)"),
    Case("cache-info-inf-bf16", _info(INF_BF16, "--no-verify"), "shards/shard-00001.safetensors (chat: 2 values"),
    Case("cache-info-names-the-fix", _info(NAN_F32), "rebuild the cache with `crossdiff cache`"),
    Case("cache-info-binary", _info_bin(INF_BF16), "holds NaN or inf activations"),
    Case("check-finite", _api(NAN_F32, lambda c: ActivationCache(c).check_finite()), "holds NaN or inf activations: shards/shard-00001"),
    Case("summary", _api(INF_BF16, cache_summary), "(chat: 2 values, first in row 1)"),
    Case("manifest-stats-nan", _stats_nan, "stats.chat.mean holds non-numbers or NaN/inf"),
]


@pytest.mark.parametrize("case", NONFINITE_CASES, ids=_ids(NONFINITE_CASES))
def test_nonfinite_values_never_pass(case, tmp_path, stack):
    check(case, tmp_path, stack)


# ---------------------------------------------------------------------------------------------- 4. identity by content, not by path
# One small world, built once: a tiny model pair (and a second pair of other weights), a cache of the first
# pair made by `run_cache` (its manifest records the models' content fingerprints), two crosscoders trained
# (here: initialised) on it and each one's latents.parquet from the analysis (recording its weights hash).

LAYER = 1
CONVERSATIONS = [[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the weather is sunny"}],
                 [{"role": "user", "content": "to be or not"}, {"role": "assistant", "content": "that is the question"}]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import pandas as pd

    from crossdiff_core.analysis import AnalysisConfig, run_analysis
    from crossdiff_core.caching import run_cache
    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
    from crossdiff_core.data import DataConfig
    from tests.test_models import build_tokenizer, save_model, tiny_config

    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: the CLI's answer must be its one error line
    root = tmp_path_factory.mktemp("world")
    tok = build_tokenizer(0)
    cfg = tiny_config("llama", len(tok))
    w = {"root": root, "tok": tok, "cfg": cfg,
         "base": save_model(root / "models/base", cfg, tok, 1), "chat": save_model(root / "models/chat", cfg, tok, 2),
         "base2": save_model(root / "other/base", cfg, tok, 3), "chat2": save_model(root / "other/chat", cfg, tok, 4)}
    words = ["the", "user", "asked", "a", "question", "about", "weather", "sunny", "world", "hello"]
    rng = np.random.default_rng(0)
    pd.DataFrame({"text": [" ".join(rng.choice(words, 20)) for _ in range(20)]}).to_parquet(root / "text.parquet")
    with open(root / "chats.jsonl", "w") as f:
        for c in CONVERSATIONS:
            f.write(json.dumps({"messages": c}) + "\n")
    (root / "prompts.txt").write_text("hello there\nthe weather\n")
    data = DataConfig(text=[str(root / "text.parquet")], n_tokens=240, max_length=32)
    for name, (b, c) in {"cache": (w["base"], w["chat"]), "cache2": (w["base2"], w["chat2"])}.items():
        run_cache(b, c, root / name, data, layer=LAYER, dtype="float32", cache_dtype="float32", shard_tokens=120,
                  progress=False)
        w[name] = root / name
    cache = ActivationCache(root / "cache")
    for i, name in enumerate(("cc", "cc2")):
        model = CrossCoder(CrossCoderConfig(kind="l1", d_model=cache.d_model, dict_size=16, l1_coeff=1.0, init_norm=0.3,
                                            cache=str(root / "cache"), cache_manifest_hash=cache.manifest_hash),
                           scales=cache.scales(), seed=i)
        with torch.no_grad():
            model.b_enc.fill_(0.5)  # every latent fires: a table without dead latents
        model.save(root / name)
        run_analysis(root / name, root / "cache", root / f"an_{name}/latents.parquet", cfg=AnalysisConfig(progress=False))
        w[name], w[f"latents_{name}"] = root / name, root / f"an_{name}/latents.parquet"
    yield w
    hf_logging.enable_progress_bar()
    torch.set_num_threads(threads)


def _evaluate(w, *args: str, latents: str = "latents_cc", cc: str | Path = "cc"):
    """`crossdiff evaluate` of a crosscoder (a world key or a directory) on the world's chats."""
    cc = w[cc] if isinstance(cc, str) else cc
    return ["evaluate", "--crosscoder", str(cc), "--latents", str(w[latents]), "--chats", str(w["root"] / "chats.jsonl"),
            "--out", str(w["root"] / "unused/kl.json"), "--tokens", "60", "--n-random", "1", "--no-progress", *args]


def _steer(w, *args: str, latents: str = "latents_cc", cc: Path | None = None):
    return ["steer", "--crosscoder", str(cc or w["cc"]), "--latents", str(w[latents]), "--prompts", str(w["root"] / "prompts.txt"),
            "--out", str(w["root"] / "unused/steer.json"), "--max-new-tokens", "2", "--alphas", "1", "--latent", "0",
            "--no-progress", *args]


def _cards(w, *args: str, latents: str = "latents_cc", cache: str = "cache"):
    return ["cards", "--crosscoder", str(w["cc"]), "--latents", str(w[latents]), "--cache", str(w[cache]),
            "--out", str(w["root"] / "unused/cards.json"), "--no-progress", *args]


def _world_cli(args: Callable[[dict, Path], list[str]]):
    """A case that runs the CLI on the world (plus whatever `args` builds under tmp_path)."""
    def make(w):
        def build(tmp, stack):
            a = args(w, tmp)
            return lambda: _cli(*a)
        return build
    return make


def _relocated_world(tmp: Path, w: dict, edit: Callable[[dict], None] = lambda m: None) -> tuple[Path, Path]:
    """A copy of the world's cache and models under `tmp` (the manifest naming the copies, then `edit`ed), and a
    crosscoder trained on that copy; returns (cache, crosscoder)."""
    import shutil

    from crossdiff_core.crosscoder import CrossCoder

    shutil.copytree(w["cache"], tmp / "cache")
    for m in ("base", "chat"):
        shutil.copytree(w[m], tmp / "models" / m)

    def names(m):
        m["models"]["base"], m["models"]["chat"] = str(tmp / "models/base"), str(tmp / "models/chat")
        edit(m)
    _edit_manifest(tmp / "cache", names)
    cc = CrossCoder.load(w["cc"])
    cc.cfg.cache, cc.cfg.cache_manifest_hash = str(tmp / "cache"), ActivationCache(tmp / "cache").manifest_hash
    cc.save(tmp / "cc")
    return tmp / "cache", tmp / "cc"


def _rebuilt_at_same_path(w, tmp):
    """The pair the cache was made from is rebuilt (other weights) at the same path; evaluate uses the recorded paths."""
    from tests.test_models import save_model

    _, cc = _relocated_world(tmp, w)
    save_model(tmp / "models/base", w["cfg"], w["tok"], 7)
    return _evaluate(w, cc=cc)


def _rebuilt_steer(w, tmp):
    from tests.test_models import save_model

    _, cc = _relocated_world(tmp, w)
    save_model(tmp / "models/chat", w["cfg"], w["tok"], 8)
    return _steer(w, cc=cc)


def _training_cache_rebuilt(w, tmp):
    """The training cache was rebuilt at its path since training: its manifest is no record of the training models."""
    cache, cc = _relocated_world(tmp, w)
    _edit_manifest(cache, lambda m: m.update(code_version="rebuilt"))
    return _evaluate(w, cc=cc)


def _analyze_rebuilt_cache(w, tmp):
    """Another cache whose manifest names the same model paths but records other content (models rebuilt there)."""
    cache, _ = _relocated_world(tmp, w)
    _edit_manifest(cache, lambda m: m["models"]["fingerprints"]["chat"].update(weights="0" * 64))
    return ["analyze", "--crosscoder", str(w["cc"]), "--cache", str(cache), "--out", str(tmp / "o.parquet")]


def _report_of(kind: str):
    """A report combining cc's latents with the `kind` product of cc2 (its inputs record cc2's weights hash)."""
    def args(w, tmp):
        from crossdiff_core.crosscoder import CrossCoder

        sha = CrossCoder.load(w["cc2"]).weights_sha256
        doc = {"kl": {"sets": [], "groups": {}, "inputs": {"crosscoder": str(w["cc2"]), "weights_sha256": sha}},
               "cards": {"cards": [], "inputs": {"crosscoder": str(w["cc2"]), "weights_sha256": sha}},
               "steering": {"latents": [], "inputs": {"crosscoder": str(w["cc2"]), "weights_sha256": sha}}}[kind]
        (tmp / f"{kind}.json").write_text(json.dumps(doc))
        return ["report", "--out", str(tmp / "report"), "--latents", f"a={w['latents_cc']}", f"--{kind}", f"a={tmp / f'{kind}.json'}"]
    return args


FINGERPRINT_CASES = [
    ("rebuilt-model-same-path", _world_cli(_rebuilt_at_same_path), "loaded '"),
    ("rebuilt-model-names-both-hashes", _world_cli(_rebuilt_at_same_path), "base: trained on '"),
    ("rebuilt-chat-steer", _world_cli(_rebuilt_steer), "the models loaded are not the ones the crosscoder was trained on"),
    ("training-cache-rebuilt", _world_cli(_training_cache_rebuilt), "was rebuilt since"),
    ("other-base-chat-evaluate", _world_cli(lambda w, t: _evaluate(w, "--base", w["base2"], "--chat", w["chat2"])),
     "pass the models the cache was made with, or --allow-mismatch"),
    ("other-base-chat-steer", _world_cli(lambda w, t: _steer(w, "--base", w["base2"], "--chat", w["chat2"])),
     "(weights "),
    ("crosscoder-from-another-cache", _world_cli(lambda w, t: ["analyze", "--crosscoder", str(w["cc"]), "--cache",
                                                               str(w["cache2"]), "--out", str(t / "o.parquet")]),
     "holds activations of other content"),
    ("analyze-cache-of-rebuilt-models", _world_cli(_analyze_rebuilt_cache), "chat (weights) differ"),
    ("cards-on-another-cache", _world_cli(lambda w, t: _cards(w, cache="cache2")), "--allow-mismatch"),
    ("latents-of-another-crosscoder-evaluate", _world_cli(lambda w, t: _evaluate(w, latents="latents_cc2")),
     "was written for the crosscoder"),
    ("latents-of-another-crosscoder-steer", _world_cli(lambda w, t: _steer(w, latents="latents_cc2")), "(weights sha256 "),
    ("latents-of-another-crosscoder-cards", _world_cli(lambda w, t: _cards(w, latents="latents_cc2")), "/cc2 (weights sha256"),
    ("report-kl-of-another-crosscoder", _world_cli(_report_of("kl")), "(per --kl "),
    ("report-cards-of-another-crosscoder", _world_cli(_report_of("cards")), "(per --cards "),
    ("report-steering-of-another-crosscoder", _world_cli(_report_of("steering")), "pass --allow-mismatch"),
]


@pytest.mark.parametrize("name,make,match", FINGERPRINT_CASES, ids=[c[0] for c in FINGERPRINT_CASES])
def test_identity_by_content_not_by_path(world, name, make, match, tmp_path, stack):
    check(Case(name, make(world), match, keep=None), tmp_path, stack)


def test_same_content_elsewhere_passes_and_cross_use_is_explicit(world, tmp_path):
    """A byte copy of the models at another path is the same models; --allow-mismatch runs a deliberate
    cross-use and records it; a fingerprint is independent of the dtype the model is loaded in."""
    from crossdiff_core.kl_eval import EvaluateConfig, evaluate_crosscoder
    from crossdiff_core.models import load_model, model_fingerprint

    _, cc = _relocated_world(tmp_path, world)  # same content, other paths
    cfg = dict(chats=[str(world["root"] / "chats.jsonl")], tokens=60, n_random=1, progress=False)
    d = evaluate_crosscoder(cc, world["latents_cc"], EvaluateConfig(**cfg))
    assert d["inputs"]["models_check"] == "same models" and d["inputs"]["weights_sha256"]
    d = evaluate_crosscoder(world["cc"], world["latents_cc"], EvaluateConfig(**cfg, allow_mismatch=True),
                            base=world["base2"], chat=world["chat2"])
    assert d["inputs"]["models_check"] == "allowed"
    f32, bf16 = (model_fingerprint(load_model(world["base"], dtype=t)) for t in ("float32", "bfloat16"))
    assert f32 == bf16 and f32 != model_fingerprint(load_model(world["base2"], dtype="float32"))
    assert ActivationCache(world["cache"]).manifest["models"]["fingerprints"]["base"] == f32


# ---------------------------------------------------------------------------------------------- 5b. non-finite inputs of analyze/evaluate/load


def _nan_crosscoder(tensor: str, value: float, tmp: Path, w: dict) -> Path:
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(w["cc"], tmp / "bad_cc")
    sd = load_file(tmp / "bad_cc/model.safetensors")
    sd[tensor].view(-1)[1] = value
    save_file(sd, tmp / "bad_cc/model.safetensors")
    return tmp / "bad_cc"


def _config_literal(literal: str):
    def build(w):
        def b(tmp, stack):
            import shutil

            from crossdiff_core.crosscoder import CrossCoder

            shutil.copytree(w["cc"], tmp / "bad_cc")
            text = (tmp / "bad_cc/config.json").read_text().replace('"aux_alpha": 0.25', f'"aux_alpha": {literal}')
            assert literal in text
            (tmp / "bad_cc/config.json").write_text(text)
            return lambda: CrossCoder.load(tmp / "bad_cc")
        return b
    return build


def _analyze_nonfinite_cache(build_cache):
    def build(w):
        def b(tmp, stack):
            from crossdiff_core.analysis import AnalysisConfig, run_analysis
            from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig

            cache = build_cache(tmp, stack)
            CrossCoder(CrossCoderConfig(kind="l1", d_model=D, dict_size=8, l1_coeff=1.0)).save(tmp / "cc8")
            return lambda: run_analysis(tmp / "cc8", cache, tmp / "o.parquet", cfg=AnalysisConfig(progress=False))
        return b
    return build


def _load_bad(tensor: str, value: float):
    def build(w):
        def b(tmp, stack):
            from crossdiff_core.crosscoder import CrossCoder

            path = _nan_crosscoder(tensor, value, tmp, w)
            return lambda: CrossCoder.load(path)
        return b
    return build


def _cli_bad_weights(command: str):
    def build(w):
        def b(tmp, stack):
            path = _nan_crosscoder("b_enc", float("inf"), tmp, w)
            if command == "analyze":
                return lambda: _cli("analyze", "--crosscoder", str(path), "--cache", str(w["cache"]), "--out", str(tmp / "o.parquet"))
            return lambda: _cli(*_evaluate(w, cc=path))
        return b
    return build


def _evaluate_nonfinite_activations(w):
    def b(tmp, stack):
        from crossdiff_core.crosscoder import CrossCoder
        from crossdiff_core.data import tokenize_chat
        from crossdiff_core.kl_eval import KLConfig, PatchSet, kl_gap
        from crossdiff_core.models import decoder_layers, load_pair

        pair = load_pair(w["base"], w["chat"], layer=LAYER, dtype="float32")
        with torch.no_grad():
            next(decoder_layers(pair.chat)[0].mlp.parameters()).fill_(float("nan"))  # a broken fine-tune
        seqs = [tokenize_chat(pair.tokenizer, c) for c in CONVERSATIONS]
        sets = [PatchSet("chat", chat=True), PatchSet("base")]
        return lambda: kl_gap(pair, CrossCoder.load(w["cc"]), seqs, sets, KLConfig(progress=False))
    return b


def _analyze_in_memory(w):
    def b(tmp, stack):
        from crossdiff_core.analysis import AnalysisConfig, analyze
        from crossdiff_core.crosscoder import CrossCoder

        model = CrossCoder.load(w["cc"])
        with torch.no_grad():
            model.W_enc[0, 0, 0] = float("nan")
        return lambda: analyze(model, ActivationCache(w["cache"]), AnalysisConfig(progress=False))
    return b


MY_NONFINITE_CASES = [
    ("analyze-nan-cache", _analyze_nonfinite_cache(NAN_F32), "holds NaN or inf activations (base) in rows 7..7"),
    ("analyze-inf-cache-bf16", _analyze_nonfinite_cache(INF_BF16), "activations (chat) in rows 7..8"),
    ("analyze-names-the-cache", _analyze_nonfinite_cache(NAN_F32), "crossdiff cache-info --cache"),
    ("analyze-in-memory-nan-weight", _analyze_in_memory, "weights ['W_enc'] hold NaN or inf"),
    ("load-nan-weight", _load_bad("W_dec", float("nan")), "holds NaN or inf weights: W_dec (1 values)"),
    ("load-inf-scale", _load_bad("scales", float("inf")), "scales (1 values)"),
    ("cli-analyze-inf-bias", _cli_bad_weights("analyze"), "NaN or inf weights: b_enc"),
    ("cli-evaluate-inf-bias", _cli_bad_weights("evaluate"), "NaN or inf weights: b_enc"),
    ("config-json-nan", _config_literal("NaN"), "NaN is not a finite number"),
    ("config-json-infinity", _config_literal("-Infinity"), "-Infinity is not a finite number"),
    ("evaluate-nonfinite-model-activations", _evaluate_nonfinite_activations, "chat model's block-1 activations hold NaN"),
]


@pytest.mark.parametrize("name,make,match", MY_NONFINITE_CASES, ids=[c[0] for c in MY_NONFINITE_CASES])
def test_nonfinite_inputs_of_the_stages_never_pass(world, name, make, match, tmp_path, stack):
    check(Case(name, make(world), match, keep=None), tmp_path, stack)


# ---------------------------------------------------------------------------------------------- 6. no traceback for a user error


def _train(w, tmp, *args: str):
    return ["train", "--cache", str(w["cache"]), "--out", str(tmp / "train"), "--dict-size", "16", "--tokens", "512",
            "--batch-size", "64", *args]


def _cc_file(name: str, data: bytes | Callable[[bytes], bytes], command: str = "analyze"):
    """The world's crosscoder with `name` replaced by `data` (or `data(old bytes)`)."""
    def args(w, tmp):
        import shutil

        shutil.copytree(w["cc"], tmp / "cc")
        old = (tmp / "cc" / name).read_bytes()
        (tmp / "cc" / name).write_bytes(data(old) if callable(data) else data)
        if command == "synth-score":
            return ["synth-score", "--crosscoder", str(tmp / "cc"), "--cache", str(w["cache"])]
        return ["analyze", "--crosscoder", str(tmp / "cc"), "--cache", str(w["cache"]), "--out", str(tmp / "o.parquet")]
    return args


def _config_edit(edit: Callable[[dict], Any]):
    def data(old: bytes) -> bytes:
        d = json.loads(old)
        edit(d)
        return json.dumps(d).encode()
    return data


def _bad_latents(make: Callable[[Any], Any], command: str = "evaluate"):
    """The world's latents.parquet rewritten by `make(table)` (a DataFrame to write, or bytes)."""
    def args(w, tmp):
        import pandas as pd

        out = make(pd.read_parquet(w["latents_cc"]))
        p = tmp / "latents.parquet"
        p.write_bytes(out) if isinstance(out, bytes) else out.to_parquet(p)
        if command == "report":
            (tmp / "latents.summary.json").write_bytes(Path(str(w["latents_cc"]).replace(".parquet", ".summary.json")).read_bytes())
            return ["report", "--out", str(tmp / "r"), "--latents", f"a={p}"]
        return _evaluate(w, "--latents", str(p))
    return args


def _garbage(path: Path, data: bytes = b"\x00garbage" * 40) -> Path:
    path.write_bytes(data)
    return path


def _report_with(opt: str, content: bytes | None):
    def args(w, tmp):
        target = tmp / f"{opt}.input" if content is not None else tmp / f"missing-{opt}.json"
        if content is not None:
            target.write_bytes(content)
        return ["report", "--out", str(tmp / "r"), "--latents", f"a={w['latents_cc']}", f"--{opt}", f"a={target}"]
    return args


NO_TRACEBACK_CASES = [
    # train: sizes, non-finite numbers, flags of the other kind, a device that is not there
    ("train-val-tokens-negative", lambda w, t: _train(w, t, "--kind", "l1", "--val-tokens", "-100"), "--val-tokens"),
    ("train-l1-coeff-nan", lambda w, t: _train(w, t, "--kind", "l1", "--l1-coeff", "nan"), "finite l1_coeff > 0 (got nan)"),
    ("train-l1-coeff-zero", lambda w, t: _train(w, t, "--kind", "l1", "--l1-coeff", "0"), "finite l1_coeff > 0 (got 0.0)"),
    ("train-k-for-l1", lambda w, t: _train(w, t, "--kind", "l1", "--k", "8"), "--k applies to batchtopk crosscoders only"),
    ("train-l1-coeff-for-batchtopk", lambda w, t: _train(w, t, "--kind", "batchtopk", "--l1-coeff", "2"),
     "--l1-coeff applies to l1 crosscoders only"),
    ("train-dict-size-zero", lambda w, t: _train(w, t, "--kind", "l1", "--dict-size", "0"), "dict_size must be positive"),
    ("train-batch-size-negative", lambda w, t: _train(w, t, "--kind", "l1", "--batch-size", "-4"), "--batch-size must be positive"),
    ("train-dead-tokens-zero", lambda w, t: _train(w, t, "--kind", "l1", "--dead-tokens", "0"), "--dead-tokens >= 1"),
    ("train-device-not-here", lambda w, t: _train(w, t, "--kind", "l1", "--device", "cuda:99"), "--device cuda:99"),
    ("train-device-unknown", lambda w, t: _train(w, t, "--kind", "l1", "--device", "gpu7"), "unknown device 'gpu7'"),
    # a crosscoder directory with a garbage, truncated or foreign file
    ("garbage-model-safetensors", _cc_file("model.safetensors", b"garbage" * 9), "is not a readable safetensors file"),
    ("truncated-model-safetensors", _cc_file("model.safetensors", lambda b: b[:200]), "truncated or corrupt"),
    ("synth-score-garbage-safetensors", _cc_file("model.safetensors", b"\x01" * 64, "synth-score"), "not a readable safetensors"),
    ("garbage-config-json", _cc_file("config.json", b"{not json"), "is not a readable crosscoder config"),
    ("config-json-a-list", _cc_file("config.json", b"[1, 2]"), "must hold a JSON object of settings, got list"),
    ("config-json-string-size", _cc_file("config.json", _config_edit(lambda d: d.update(dict_size="16"))),
     "dict_size must be an integer, got '16'"),
    ("config-json-without-kind", _cc_file("config.json", _config_edit(lambda d: d.pop("kind"))), "lacks the required keys ['kind']"),
    # latents.parquet: garbage, truncated, missing columns, wrong types, unknown class labels
    ("latents-garbage", _bad_latents(lambda t: b"\x00garbage" * 40), "is not a readable parquet file"),
    ("latents-truncated", _bad_latents(lambda t: t.to_parquet()[:300]), "is not a readable parquet file"),
    ("latents-missing-columns", _bad_latents(lambda t: t.drop(columns=["nu_rank", "cosine"])), "lacks the columns ['cosine', 'nu_rank']"),
    ("latents-wrong-type", _bad_latents(lambda t: t.assign(max_act=t["max_act"].astype(str))), "max_act is large_string, not number"),
    ("latents-unknown-class", _bad_latents(lambda t: t.assign(**{"class": ["weird"] * len(t)})), "class labels ['weird'] are none of"),
    ("evaluate-device-not-here", lambda w, t: _evaluate(w, "--device", "cuda:99"), "--device cuda:99"),
    ("steer-alphas-nan", lambda w, t: _steer(w, "--alphas", "nan"), "steering coefficients must be finite"),
    ("cards-steering-garbage", lambda w, t: _cards(w, "--steering", str(_garbage(t / "s.json"))), "is not readable JSON"),
    ("cards-tracking-garbage", lambda w, t: _cards(w, "--tracking", str(_garbage(t / "t.parquet"))), "t.parquet is not a readable parquet"),
    ("cards-steering-missing", lambda w, t: _cards(w, "--steering", str(t / "none.json")), "none.json does not exist"),
    # the report's inputs: missing or garbage files, missing columns and keys
    ("report-latents-missing-columns", _bad_latents(lambda t: t.drop(columns=["class"]), "report"), "lacks the columns ['class']"),
    ("report-latents-garbage", _bad_latents(lambda t: b"PAR1" + b"\x00" * 64, "report"), "is not a readable parquet file"),
    ("report-kl-garbage", _report_with("kl", b"{garbage"), "kl.input is not readable JSON"),
    ("report-kl-missing", _report_with("kl", None), "missing-kl.json does not exist"),
    ("report-kl-no-sets", _report_with("kl", b"{}"), "`sets` is not a list of objects"),
    ("report-kl-set-without-groups", _report_with("kl", json.dumps({"sets": [{"name": "a", "group": "", "kl": {},
                                                                             "gap_closed": {}}]}).encode()),
     "sets[0].kl lacks the token groups"),
    ("report-cards-a-list", _report_with("cards", b"[1]"), "holds a JSON list, not the object"),
    ("report-steering-no-runs", _report_with("steering", b'{"latents": [{"latent": 1}]}'), "latents[0] lacks the keys ['runs']"),
    ("report-tracking-garbage", _report_with("tracking", b"\x00" * 50), "tracking.input is not a readable parquet file"),
]


@pytest.mark.parametrize("name,args,match", NO_TRACEBACK_CASES, ids=[c[0] for c in NO_TRACEBACK_CASES])
def test_no_traceback_for_a_user_error(world, name, args, match, tmp_path, stack):
    check(Case(name, _world_cli(args)(world), match, keep=None), tmp_path, stack)


def test_foreign_config_json_loads_with_null_or_missing_optional_keys(world, tmp_path):
    """A config.json another tool wrote: optional keys null or absent take their defaults."""
    import shutil

    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig

    shutil.copytree(world["cc"], tmp_path / "cc")
    full = json.loads((tmp_path / "cc/config.json").read_text())
    variants = {"btk-l1-null": {**full, "kind": "batchtopk", "k": 2, "l1_coeff": None},
                "l1-k-null": {**full, "k": None, "threshold_decay": None, "aux_k": None, "aux_alpha": None},
                "design-keys-only": {k: full[k] for k in ("kind", "d_model", "dict_size")}}
    for name, d in variants.items():
        (tmp_path / "cc/config.json").write_text(json.dumps(d))
        cfg = CrossCoder.load(tmp_path / "cc").cfg
        assert (cfg.kind, cfg.d_model, cfg.dict_size) == (d["kind"], full["d_model"], full["dict_size"]), name
        assert cfg.aux_alpha == CrossCoderConfig.aux_alpha and cfg.l1_coeff >= 0, name


def test_kind_flags_are_not_written_and_l1_has_a_nonzero_default(world, tmp_path):
    """An L1 run without --l1-coeff trains with the documented default λ (never 0) and records no k."""
    from crossdiff_core.crosscoder import CrossCoderSettings

    r = _cli(*_train(world, tmp_path, "--kind", "l1", "--val-tokens", "0"))
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "train/config.json").read_text())
    assert cfg["k"] is None and cfg["l1_coeff"] == CrossCoderSettings.l1_coeff > 0
