"""Process memory: glibc's allocator thresholds, and the cyclic collector's view of the start-up heap.

**The allocator.** Keep glibc's allocator from returning large buffers to the kernel after every use.

A stage moves whole batches of tensors through Redis: a 16-frame batch of
128x128 float32 tensors is a 1 MB value, packed, sent, received and unpacked
several times per task. glibc serves an allocation above its mmap threshold
(128 KiB at start, raised only as big blocks are freed) with a fresh
``mmap`` and gives it back with ``munmap``: every such buffer then costs page
faults on each of its pages, which made the Redis hand-off of a batch 3 to 6
times dearer than its copy (docs/performance.md). Fixing the thresholds keeps
those buffers in the heap, reused from task to task.

``tune_malloc`` sets ``M_MMAP_THRESHOLD`` (allocations above it still get
their own mapping) and ``M_TRIM_THRESHOLD`` (free memory at the top of the
heap above it is returned to the kernel) with ``mallopt``; a prefork child
inherits them. ``STREAMD_MALLOC_TUNING=0`` leaves the allocator alone. On a
C library other than glibc (musl, macOS) it does nothing.

**The collector.** A daemon or worker process holds some 100 000 objects
once it has started (modules, faust's and Celery's machinery, the Nodes),
and Python's full (generation 2) collection walks all of them: 40 to 90 ms
with the GIL held, about once a minute at a steady load, during which the
process hands off or runs nothing (docs/performance.md). ``freeze_heap``
collects once and moves every object alive then into the permanent
generation (:func:`gc.freeze`), which later collections skip: they walk only
what was made since. Start-up objects live as long as the process anyway;
what they held as garbage was collected first. In a Celery prefork parent it
also keeps the children's collections from writing into pages they share
with the parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time

__all__ = ["tune_malloc", "freeze_heap", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger(__name__)

#: Allocations up to this size come from the heap (glibc caps it at 32 MiB on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap above this much is given back to the kernel.
TRIM_THRESHOLD = 128 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's thresholds for this process; True when they were set."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt but ignores these
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.warning("mallopt refused the allocator thresholds; large buffers stay on mmap")
    return ok


def freeze_heap(what: str) -> int:
    """Collect, then take every object alive now out of later collections (see the module's doc);
    ``what`` names the moment in the debug log. Returns how many objects are frozen in all."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%s: %d objects frozen out of the cyclic collector's full collections (%.0f ms)", what, frozen,
              (time.perf_counter() - t0) * 1000)
    return frozen
