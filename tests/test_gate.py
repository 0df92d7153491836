"""streamd.gate: compute slots shared by forked processes, as a prefork pool's are."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable

import pytest

from streamd.gate import NO_GATE, ComputeGate, pool_index

FORK = multiprocessing.get_context("fork")


def _forked(target: Callable[[], None]) -> int:
    """Run ``target`` in a forked child; return its exit status (0: it returned)."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            target()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_no_more_processes_compute_at_once_than_there_are_slots() -> None:
    gate = ComputeGate(2, 3)
    inside, most = FORK.Value("i", 0), FORK.Value("i", 0)
    rounds = FORK.Value("i", 0)

    def work(index: int) -> None:
        gate.attach(index)
        for _ in range(40):
            gate.enter()
            with inside.get_lock():
                inside.value += 1
                most.value = max(most.value, inside.value)
            time.sleep(0.002)  # Nodes running
            with inside.get_lock():
                inside.value -= 1
            gate.leave()
            time.sleep(0.001)  # the task's waits, outside the gate
            with rounds.get_lock():
                rounds.value += 1

    procs = [FORK.Process(target=work, args=(i,)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert rounds.value == 120  # every process got its turns
    assert most.value == 2  # two at once, never three


def test_enter_and_leave_nest_once_per_process() -> None:
    gate = ComputeGate(1, 1)
    gate.enter()
    gate.enter()  # held already: no second slot (with one slot, a second acquire would block for ever)
    assert gate.held
    gate.leave()
    assert not gate.held
    gate.leave()  # nothing held: nothing given back twice

    def other() -> None:
        gate.attach(0)
        gate.enter()  # the one slot is free again
        gate.leave()

    assert _forked(other) == 0


def test_waits_for_a_slot_are_reported() -> None:
    waited = FORK.Array("d", 1)
    gate = ComputeGate(1, 2, on_wait=lambda s: waited.__setitem__(0, waited[0] + s))
    gate.attach(0)
    gate.enter()

    asking = FORK.Event()

    def second() -> None:
        gate.attach(1)
        asking.set()
        gate.enter()  # waits until the parent leaves
        gate.leave()

    child = FORK.Process(target=second)
    child.start()
    assert asking.wait(10)
    child.join(0.3)
    assert child.is_alive()  # still waiting for the slot the parent holds
    gate.leave()
    child.join(10)
    assert child.exitcode == 0
    assert waited[0] >= 0.2


def test_a_slot_held_by_a_killed_process_is_given_back_by_its_replacement() -> None:
    gate = ComputeGate(1, 2)
    ready = FORK.Event()

    def holder() -> None:
        gate.attach(0)
        gate.enter()
        ready.set()
        time.sleep(60)  # killed while it holds the slot

    victim = FORK.Process(target=holder)
    victim.start()
    assert ready.wait(10)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    victim.join(10)

    def blocked() -> None:  # the slot went with the killed process: another index cannot get it
        gate.attach(1)
        assert not gate._sem.acquire(timeout=0.2)

    assert _forked(blocked) == 0

    def replacement() -> None:  # the pool's replacement takes the dead process's index and gives the slot back
        gate.attach(0)
        gate.enter()
        gate.leave()

    assert _forked(replacement) == 0
    gate.attach(1)
    gate.enter()  # free again for everyone
    gate.leave()


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1 slot"):
        ComputeGate(0, 2)


def test_no_gate_lets_everyone_in() -> None:
    NO_GATE.enter()
    NO_GATE.enter()
    NO_GATE.leave()


def test_pool_index_outside_a_pool_is_none() -> None:
    assert pool_index() is None
