"""streamd.worker: the pool and concurrency a worker chooses."""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest

from streamd.config import Settings
from streamd.worker import choose_pool, cuda_usable

CORES = os.cpu_count() or 1


def test_cpu_worker_runs_one_process_per_core():
    assert choose_pool(["cpu"], Settings(), None, None) == ("prefork", CORES)


def test_gpu_worker_on_a_gpu_runs_one_process():
    assert choose_pool(["gpu"], Settings(), None, None, cuda=True) == ("prefork", 1)
    assert choose_pool(["cpu", "gpu"], Settings(), None, None, cuda=True) == ("prefork", 1)


def test_gpu_worker_whose_models_fall_back_to_the_cpu_runs_one_process_per_core():
    # one process would leave the other cores idle while the model, on the CPU, is the slowest Node
    assert choose_pool(["gpu"], Settings(), None, None, cuda=False) == ("prefork", CORES)


def test_explicit_concurrency_and_pool_win():
    assert choose_pool(["gpu"], Settings(worker_concurrency=3), None, None, cuda=False) == ("prefork", 3)
    assert choose_pool(["gpu"], Settings(worker_concurrency=3), "solo", 2, cuda=True) == ("solo", 2)
    assert choose_pool(["cpu"], Settings(), None, 0) == ("prefork", CORES)


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
def test_without_cuda_the_gpu_worker_defaults_to_one_process_per_core():
    assert choose_pool(["gpu"], Settings(), None, None) == ("prefork", CORES)


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
