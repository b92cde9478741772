"""crossdiff_core.allocator: freed large blocks stay in the process (read from /proc, in fresh processes)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import os, sys
import torch
from crossdiff_core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(64 << 18)  # 64 MiB, above glibc's largest mmap threshold
held = rss()
del x
print((held - rss()) >> 20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    def released(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
        return int(out.stdout.strip())

    assert released("default") >= 60  # glibc unmaps the block on free
    assert released("keep") <= 4  # kept for the next step's temporaries
