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


# A start-up heap of 200 000 objects in containers: a full collection walks all of them until they are frozen;
# garbage that existed before the freeze is collected, not frozen, and the collector still finds new cycles.
FREEZE_CHILD = """
import gc, time, weakref
from streamd.memory import freeze_heap

class Node:
    pass

heap = [[i] for i in range(200_000)]
cycle = Node(); cycle.self = cycle
ref = weakref.ref(cycle)
del cycle
def full_ms():
    t0 = time.perf_counter(); gc.collect(); return (time.perf_counter() - t0) * 1000
before = min(full_ms() for _ in range(3))
gc.disable()  # no collection between here and the freeze: the cycle is still garbage when freeze_heap runs
garbage = Node(); garbage.self = garbage
old = weakref.ref(garbage)
del garbage
frozen = freeze_heap("test")
gc.enable()
after = min(full_ms() for _ in range(3))
fresh = Node(); fresh.self = fresh
new = weakref.ref(fresh)
del fresh
gc.collect()
print(frozen, len(gc.get_objects()), before, after, old() is None, new() is None, ref() is None)
"""


def test_freeze_heap_takes_the_start_up_heap_out_of_full_collections():
    out = subprocess.run([sys.executable, "-c", FREEZE_CHILD], capture_output=True, text=True, check=True)
    frozen, tracked, before, after, old_gone, new_gone, ref_gone = out.stdout.split()
    assert int(frozen) > 200_000
    assert int(tracked) < 1_000  # what a full collection still walks
    assert float(after) < float(before) / 5
    assert old_gone == new_gone == ref_gone == "True"
