"""The compute gate: at most ``slots`` of a prefork pool's processes run Nodes at once.

A stage task does not compute all the time it runs: it waits for its inputs from Redis,
for Kafka to acknowledge what its sink published, for its end-of-task writes, and
between two tasks for the worker's main process to hand it the next one. With one
process per core, each of those waits leaves a core idle (0.15-0.25 of the benchmark
VM's two cores in a backlog drain, docs/performance.md). One process more than there
are cores fills those waits, but three processes computing on two cores slice each
other's time and caches, which cost what the extra process gained (docs/performance.md,
eighth and ninth rounds).

The gate keeps both: a worker on the CPU runs one process per core plus one, and a
process holds one of ``slots`` (the cores) while its Nodes run. It takes a slot at its
first Node and keeps it across the stage's Nodes (and an in-process child stage's),
and gives it back before it waits: before a sink Node (which waits for Kafka), before
it stores outputs and dispatches child stages, and at the end of the task. The
process that waited for a slot takes the core over while the other waits.

Slots are a POSIX semaphore made by the worker's main process before its pool forks.
A process killed while it holds a slot (the OOM killer, a crash in native code) would
take the slot with it; so each process records the slot it holds under its pool index
(billiard's ``index``, which the process that replaces it takes over), and the
replacement gives back a slot its predecessor still held (:meth:`ComputeGate.attach`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Gate", "ComputeGate", "NO_GATE", "pool_index"]

log = logging.getLogger(__name__)


class Gate(Protocol):
    """What the stage executor asks of a gate."""

    def enter(self) -> None:
        """Hold a slot (wait for one if none is free); nothing if this process holds one already."""

    def leave(self) -> None:
        """Give the slot back, if this process holds one."""

    def attach(self, index: int | None) -> None:
        """In a new pool process, before its first task: ``index`` is its pool index (None: it has none)."""


class _NoGate:
    """Every process computes whenever it has work (one process per core, or a GPU worker)."""

    def attach(self, index: int | None) -> None:
        pass

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass


NO_GATE: Gate = _NoGate()


class ComputeGate:
    """``slots`` compute slots shared by the processes forked after it was made (see the module).

    ``processes``: the pool's size, for the record of who holds a slot by pool index. ``on_wait``
    is called in the waiting process with the seconds it waited for a slot, when it had to wait.
    """

    def __init__(self, slots: int, processes: int, on_wait: Callable[[float], None] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"a compute gate needs at least 1 slot, got {slots}")
        ctx = multiprocessing.get_context("fork")
        self.slots = slots
        self.on_wait = on_wait
        self._sem = ctx.Semaphore(slots)
        self._holders = ctx.RawArray("i", max(1, processes))  # by pool index: pid holding a slot, or 0
        self._index: int | None = None
        self._held = False

    def attach(self, index: int | None) -> None:
        """In a pool process, at its start: ``index`` is its pool index (None: it has none). A slot that
        the process it replaces still held (it died holding it) is given back."""
        self._held = False
        self._index = index if index is not None and 0 <= index < len(self._holders) else None
        if self._index is None:
            return
        dead = self._holders[self._index]
        if dead and dead != os.getpid():
            self._holders[self._index] = 0
            self._sem.release()
            log.warning("pool process %d ended while it held a compute slot; slot given back by process %d",
                        dead, os.getpid())

    def enter(self) -> None:
        if self._held:
            return
        if not self._sem.acquire(block=False):
            start = time.perf_counter()
            self._sem.acquire()
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - start)
        self._held = True
        if self._index is not None:
            self._holders[self._index] = os.getpid()

    def leave(self) -> None:
        if not self._held:
            return
        if self._index is not None:
            self._holders[self._index] = 0
        self._held = False
        self._sem.release()

    @property
    def held(self) -> bool:
        """Whether this process holds a slot now."""
        return self._held


def pool_index() -> int | None:
    """This process's index in its billiard (Celery prefork) pool; None outside one."""
    try:
        from billiard.process import current_process
    except ImportError:  # pragma: no cover - billiard comes with Celery
        return None
    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else None
