"""Process allocator settings: applied on glibc, skipped on request, and measurably keeping freed memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loratune import runtime

glibc = pytest.mark.skipif(runtime._libc() is None, reason="needs glibc's mallopt")

# A child process: allocate and free a 256 MiB block a few times, print the page faults the last time took.
_CHILD = """
import resource, sys
import torch
from loratune import runtime
if sys.argv[1] == "retain":
    assert runtime.retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # the last round shows the steady state
    before = faults()
    t = torch.ones(64 * 1024 * 1024)
    del t
print(faults() - before)
"""


def _steady_state_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
def test_retained_memory_is_reused_without_page_faults():
    # glibc's default unmaps the freed block, so touching a new one faults every 4 KiB page again (65536 of them);
    # with retain_freed_memory the freed block is reused as it is.
    assert _steady_state_faults("default") > 30_000
    assert _steady_state_faults("retain") < 3_000


@glibc
def test_opt_out_and_measuring_mode(monkeypatch):
    monkeypatch.setenv("LORATUNE_MALLOC", "default")
    assert runtime.retain_freed_memory() is False
    monkeypatch.delenv("LORATUNE_MALLOC")
    assert runtime.retain_freed_memory() is True
    assert runtime.return_freed_memory() is True  # and back: the test process keeps glibc-like behaviour
