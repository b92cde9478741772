"""One writer per activation cache: an advisory lock file in the cache directory, held for the whole run.

Design (readers ignore all of this):

- ``.crossdiff-lock`` is locked with ``fcntl.flock`` (non-blocking) for as long as a writer runs. A
  whole-cache writer (a full run, a merge, an overwrite) takes it *exclusively*; a slice of a cache split
  across workers (`cache_activations(shards=..., finalize=False)`) takes it *shared*, so slices run at
  once while a whole-cache writer, or a merge, waits for all of them. Slices write disjoint shard files,
  and all writers must agree on the settings record (`CacheWriter`), so shared holders never mix
  settings.
- A slice also locks its own file ``.crossdiff-lock.<tag>`` exclusively (the tag digests its shard
  list), so the same slice never runs twice at once.
- The holder writes its pid, host, start time and command into the file it holds exclusively; a writer
  that cannot get its lock reads them back (probing which files are really held) and names the holders.
- flock is released when its process dies, however it dies, so a lock file left by a killed process
  never blocks; it is overwritten by the next holder. A clean release deletes the files the writer held
  exclusively (the next locker re-checks that the file it locked is still the one at the path, the usual
  protocol for unlinked lock files); an exclusive writer also deletes stale slice files. So a finished
  cache (its last writer a full run or a merge) holds no lock file.
- On NFS, Linux emulates flock with POSIX record locks, which hold across hosts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import time
from pathlib import Path

from crossdiff_core.errors import CacheError

__all__ = ["LOCK", "WriterLock"]

LOCK = ".crossdiff-lock"


def _try_lock(path: Path, op: int) -> int | None:
    """An fd of `path` (created if absent) locked with `op` (LOCK_SH/LOCK_EX), or None when another holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise CacheError(f"cannot create the lock file {path} ({e.strerror}): make the cache directory writable, or use another --out") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CacheError(f"the lock file {path} is not a regular file: delete it, or use another --out")
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheError(f"the file system of {path.parent} does not support file locks ({e.strerror}): put the cache on a local or lock-capable file system") from e
            raise CacheError(f"cannot lock {path} ({e.strerror}): fix the cache directory's permissions, or use another --out") from e
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the last holder deleted the file between our open and flock: lock the new one


def _held_text(path: Path) -> str | None:
    """The holder record of `path` if some process holds it exclusively now, else None (a stale or free file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 4096, 0).decode(errors="replace")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"{h['role']} (pid {h['pid']} on host {h['host']} since {h['since']}, command `{h['command']}`)"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


class WriterLock:
    """The lock a `CacheWriter` holds while it runs; see the module docstring for the design.

    `slice_tag=None`: a whole-cache writer (exclusive). Otherwise a slice: shared with other slices,
    exclusive against the same `slice_tag`. `role` describes the holder in other writers' errors.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, role: str, slice_tag: str | None = None) -> None:
        self.dir = Path(cache_dir)
        self.role = role
        self.slice_tag = slice_tag
        self._main: int | None = None
        self._own: int | None = None  # the fd holding this writer's record (main, or the slice file)

    @property
    def held(self) -> bool:
        return self._main is not None

    @property
    def exclusive(self) -> bool:
        return self.slice_tag is None

    def _slice_path(self) -> Path:
        return self.dir / f"{LOCK}.{self.slice_tag}"

    def acquire(self) -> None:
        """Take the lock (no-op if held); a CacheError names the holders when another writer has it."""
        if self.held:
            return
        main = _try_lock(self.dir / LOCK, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        if main is None:
            raise self._busy()
        own = main
        if not self.exclusive:
            own = _try_lock(self._slice_path(), fcntl.LOCK_EX)
            if own is None:
                os.close(main)
                raise self._busy()
        else:
            for stale in self.dir.glob(f"{LOCK}.*"):  # no slice runs while we hold the main lock exclusively
                stale.unlink(missing_ok=True)
        record = {"role": self.role, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": shlex.join(sys.argv)[:300]}
        os.ftruncate(own, 0)
        os.pwrite(own, (json.dumps(record) + "\n").encode(), 0)
        self._main, self._own = main, own

    def release(self) -> None:
        """Drop the lock and delete the lock files no other writer holds (no-op if not held)."""
        if not self.held:
            return
        main, own = self._main, self._own
        self._main = self._own = None
        # delete only what this writer holds exclusively; a shared holder leaves the main file (upgrading
        # to delete it would make a slice starting that instant fail), and the merge deletes it later
        if own != main:
            self._slice_path().unlink(missing_ok=True)
            os.close(own)
        else:
            (self.dir / LOCK).unlink(missing_ok=True)
        os.close(main)

    def __del__(self) -> None:
        # a writer dropped without close() must not keep its cache locked (the fds would keep the lock)
        for fd in {self._main, self._own} - {None}:
            try:
                os.close(fd)
            except OSError:
                pass

    def _busy(self) -> CacheError:
        holders = []
        text = _held_text(self.dir / LOCK)
        if text is not None:
            holders.append(_describe(text))
        for f in sorted(self.dir.glob(f"{LOCK}.*")):
            if (t := _held_text(f)) is not None and (self.exclusive or f == self._slice_path()):
                holders.append(_describe(t))
        who = "; ".join(holders) if holders else "another writer (it has just finished or not yet recorded itself)"
        return CacheError(f"activation cache {self.dir} is being written by {who}: one writer per cache; wait for it "
                          "to finish (or stop it), or write to another --out")
