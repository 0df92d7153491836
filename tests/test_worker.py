"""streamd.worker: the pool, concurrency and compute slots a worker chooses."""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest

from streamd.config import Settings
from streamd.gate import NO_GATE, ComputeGate
from streamd.worker import choose_pool, compute_gate, compute_slots, cuda_usable

CORES = os.cpu_count() or 1


def test_cpu_worker_runs_one_process_per_core_plus_one_with_a_compute_slot_per_core():
    assert choose_pool(["cpu"], Settings(), None, None) == ("prefork", CORES + 1)
    assert compute_slots(Settings(), "prefork", CORES + 1) == CORES


def test_the_compute_gate_is_off_where_no_more_processes_than_slots_run():
    assert compute_slots(Settings(), "prefork", CORES) is None
    assert compute_slots(Settings(), "prefork", 1) is None  # a gpu worker on a GPU
    assert compute_slots(Settings(worker_compute_slots=4), "prefork", 4) is None
    assert compute_slots(Settings(worker_compute_slots=2), "prefork", 3) == 2
    assert compute_slots(Settings(worker_compute_slots=2), "solo", 3) is None  # prefork only
    assert compute_gate(None, 3, None, "t") is NO_GATE
    gate = compute_gate(2, 3, None, "t")
    assert isinstance(gate, ComputeGate) and gate.slots == 2


def test_waits_for_a_compute_slot_are_counted_by_topology() -> None:
    from prometheus_client import CollectorRegistry

    from streamd.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    gate = compute_gate(2, 3, metrics, "line-4")
    value = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "streamd_compute_slot_wait_seconds_total", {"topology": "line-4"})
    assert value() == 0  # exported from the start: no wait yet
    assert isinstance(gate, ComputeGate) and gate.on_wait is not None
    gate.on_wait(0.25)
    assert value() == 0.25


def test_gpu_worker_on_a_gpu_runs_one_process():
    assert choose_pool(["gpu"], Settings(), None, None, cuda=True) == ("prefork", 1)
    assert choose_pool(["cpu", "gpu"], Settings(), None, None, cuda=True) == ("prefork", 1)


def test_gpu_worker_whose_models_fall_back_to_the_cpu_runs_one_process_per_core():
    # one process would leave the other cores idle while the model, on the CPU, is the slowest Node
    assert choose_pool(["gpu"], Settings(), None, None, cuda=False) == ("prefork", CORES + 1)


def test_explicit_concurrency_and_pool_win():
    assert choose_pool(["gpu"], Settings(worker_concurrency=3), None, None, cuda=False) == ("prefork", 3)
    assert choose_pool(["gpu"], Settings(worker_concurrency=3), "solo", 2, cuda=True) == ("solo", 2)
    assert choose_pool(["cpu"], Settings(), None, 0) == ("prefork", CORES + 1)


def test_cuda_usable_follows_onnx_runtime_and_the_provider_override():
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    has_trt = "TensorrtExecutionProvider" in available
    assert cuda_usable(Settings()) is has_cuda
    assert cuda_usable(Settings(onnx_providers=("cpu",))) is False
    assert cuda_usable(Settings(onnx_providers=("cpu", "cuda"))) is False
    assert cuda_usable(Settings(onnx_providers=("cuda", "cpu"))) is has_cuda
    # TensorRT runs on the GPU too: a tensorrt-first worker on a GPU keeps one process
    assert cuda_usable(Settings(onnx_providers=("tensorrt", "cuda", "cpu"))) is (has_trt or has_cuda)
    assert cuda_usable(Settings(onnx_providers=("tensorrt", "cpu"))) is has_trt


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_without_cuda_the_gpu_worker_defaults_to_one_process_per_core_plus_one():
    assert choose_pool(["gpu"], Settings(), None, None) == ("prefork", CORES + 1)


def test_worker_processes_freeze_their_start_up_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The main process before the fork and once ready, each pool process once its Nodes are loaded."""
    from pathlib import Path

    from celery import signals

    from streamd.topology import load
    from streamd.worker import WorkerRuntime, build_worker_app

    frozen: list[str] = []
    monkeypatch.setattr("streamd.worker.freeze_heap", frozen.append)  # not this test process's heap
    monkeypatch.setattr(WorkerRuntime, "executor", lambda self: None)  # no models, no services
    path = Path(__file__).parent.parent / "topologies" / "surface-inspection.yaml"
    build_worker_app(load(path, settings=Settings()), Settings(), ["cpu", "gpu"])
    signals.worker_init.send(sender=None)
    assert set(frozen) == {"worker start-up"}
    signals.worker_ready.send(sender=None)
    signals.worker_process_init.send(sender=None)
    assert set(frozen) == {"worker start-up", "worker ready", "worker process with its Nodes loaded"}


def test_a_new_pool_process_gives_back_the_slot_its_predecessor_died_holding(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from celery import signals

    from streamd.topology import load
    from streamd.worker import WorkerRuntime, build_worker_app

    monkeypatch.setattr("streamd.worker.freeze_heap", lambda *_: None)
    monkeypatch.setattr(WorkerRuntime, "executor", lambda self: None)  # no models, no services
    monkeypatch.setattr("streamd.worker.pool_index", lambda: 0)  # this process replaces pool process 0
    gate = ComputeGate(1, 2)
    path = Path(__file__).parent.parent / "topologies" / "surface-inspection.yaml"
    _, runtime = build_worker_app(load(path, settings=Settings()), Settings(), ["cpu", "gpu"], gate=gate)
    assert runtime.gate is gate
    pid = os.fork()
    if pid == 0:  # pool process 0 takes the slot and dies holding it
        gate.attach(0)
        gate.enter()
        os._exit(0)
    os.waitpid(pid, 0)
    signals.worker_process_init.send(sender=None)  # its replacement starts
    gate.enter()  # would block for ever if the slot had gone with the dead process
    assert gate.held
    gate.leave()
