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
