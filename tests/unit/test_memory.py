"""meshd.io.memory: with its malloc settings, a large block freed goes back to the kernel at
once, even with smaller live blocks cut after it (glibc left alone keeps it in the heap)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="these are glibc's malloc settings; this C library is not glibc")

# 200 blocks of 300 KB, each followed by a small block that stays live, then the large ones
# freed. The first large block freed alone is what makes glibc raise its mmap threshold.
CODE = """
import gc, sys
import psutil
from meshd.io.memory import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
first = b"x" * 300_000
del first
keep, large = [], []
for i in range(200):
    large.append(b"x" * 300_000)
    keep.append(b"y" * 2000)
before = psutil.Process().memory_info().rss
del large
gc.collect()
print((before - psutil.Process().memory_info().rss) / 2**20)
"""


def released_mb(how: str) -> float:
    out = subprocess.run([sys.executable, "-c", CODE, how], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return float(out)


def test_large_blocks_go_back_to_the_kernel_when_freed():
    # 200 x 300 KB = 57 MiB freed: nearly all of it leaves the process
    assert released_mb("tuned") > 45


def test_glibc_left_alone_keeps_them():
    # the case the settings are for (if a glibc stops doing this, the settings are moot)
    assert released_mb("default") < 20
