"""streamd.memory: glibc's allocator thresholds, set for real in a child process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from streamd.memory import MMAP_THRESHOLD, tune_malloc

GLIBC = platform.libc_ver()[0] == "glibc"

# A stage's batch output as it crosses Redis: 16 frames of 128x128 float32 packed into one 1 MiB value and
# unpacked again, 100 times. With glibc's defaults msgpack's growing buffer is mapped and unmapped over and
# over (tens of thousands of page faults, seen: 34 000); with the thresholds fixed it stays in the heap.
CHILD = """
import resource, sys
import numpy as np
from streamd.memory import tune_malloc
from streamd.values import pack_value, unpack_value
if sys.argv[1] == "1":
    assert tune_malloc()
batch = {str(i): {"tensor": np.random.rand(1, 128, 128).astype(np.float32)} for i in range(16)}
unpack_value(pack_value(batch))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    unpack_value(pack_value(batch))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_tune_malloc_sets_the_thresholds_on_glibc():
    assert tune_malloc() is True
    assert MMAP_THRESHOLD == 32 * 1024 * 1024  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_big_buffers_are_reused_instead_of_faulted_in_again():
    default, tuned = _faults(False), _faults(True)
    assert default > 5_000
    assert tuned < default / 10
