"""Memory given back: the allocation pattern of attribution passes must not grow the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# An attribution-like pattern: each pass allocates and frees a pass's gradients (30 tensors of 7.4 MB)
# and an edge buffer, and keeps one block of rows of a few MB. Prints kept bytes and RSS growth.
PATTERN = r"""
import sys, torch
from cltrace.resources import return_freed_memory
took = return_freed_memory() if sys.argv[1] == "1" else False
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
base, kept = rss(), []
for i in range(40):
    grads = [torch.ones(32, 100, 576) for _ in range(30)]
    edges = torch.ones(32, 83400)
    kept.append(torch.ones(32, 20000 + 500 * i))
    del grads, edges
print(int(took), sum(k.numel() * 4 for k in kept), rss() - base)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def run_pattern(fix: bool) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PATTERN, "1" if fix else "0"], capture_output=True, text=True, check=True)
    took, kept, growth = map(int, out.stdout.split())
    return bool(took), kept, growth


@pytest.mark.slow
@glibc_only
def test_freed_memory_goes_back_so_resident_memory_follows_what_is_kept() -> None:
    took, kept, growth = run_pattern(fix=True)
    assert took
    assert growth <= 1.25 * kept + (16 << 20), f"resident memory grew {growth / 2**20:.0f} MB for {kept / 2**20:.0f} MB kept"
