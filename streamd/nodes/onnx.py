"""The ONNX model Node: one ONNX Runtime session per worker process.

params:
  ``model``      path of the .onnx file (relative paths: see NodeEnv.resolve_path)
  ``providers``  execution providers in order of preference, e.g. [tensorrt, cuda, cpu]
                 (default [cuda, cpu]; STREAMD_ONNX_PROVIDERS overrides for a whole worker)
  ``input_key``  key of the parent output dict that holds the tensor (default "tensor")
  ``max_batch``  inputs per session.run (default 32)
  ``warmup``     runs at start-up (default 2)
  ``half_outputs`` names of float outputs to hand on as float16 (default none): half the
                 bytes where they cross Redis to a Node in another stage

The model's own ``metadata_props`` give ``streamd.name``, ``streamd.version``,
``streamd.threshold`` and ``streamd.map_threshold``. Output of this Node per
input: ``{"outputs": {name: array}, "model": {name, version}, "threshold": t,
"map_threshold": m, "context": {other keys of the parent's dict}}``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..exceptions import ModelInputMismatch, TopologyError
from .base import Node, NodeEnv, RunContext, register

__all__ = ["OnnxModel", "PROVIDERS", "DEFAULT_PROVIDERS"]

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
#: The providers a Node asks for when its params name none.
DEFAULT_PROVIDERS = ("cuda", "cpu")
_SHORT = {v: k for k, v in PROVIDERS.items()}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@register("onnx.model")
class OnnxModel(Node):
    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        super().__init__(node_id, params, env)
        self.model_path = env.resolve_path(self.param("model", kind=str))
        if not self.model_path.is_file():
            raise TopologyError(
                f"model file {self.model_path} does not exist (set STREAMD_MODELS_DIR or fix the path)",
                path=f"nodes.{node_id}.params.model",
            )
        wanted = self.param("providers", list(DEFAULT_PROVIDERS), kind=list)
        for i, p in enumerate(wanted):
            if p not in PROVIDERS:
                raise TopologyError(f"unknown execution provider {p!r}; use {', '.join(PROVIDERS)}",
                                    path=f"nodes.{node_id}.params.providers[{i}]")
        self.wanted = list(env.settings.onnx_providers or wanted)
        self.input_key = self.param("input_key", "tensor", kind=str)
        self.max_batch = int(self.param("max_batch", 32, kind=int))
        self.warmup = int(self.param("warmup", 2, kind=int))
        self.half_outputs = [str(n) for n in self.param("half_outputs", [], kind=list)]
        self.session: Any = None
        self.provider = "cpu"
        self.model_info = {"name": self.model_path.stem, "version": "0"}
        self.threshold = 0.5
        self.map_threshold: float | None = None

    # -- lifecycle ---------------------------------------------------------------
    def setup(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        chosen = [PROVIDERS[p] for p in self.wanted if PROVIDERS[p] in available]
        missing = [p for p in self.wanted if PROVIDERS[p] not in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        threads = self.env.settings.onnx_threads or max(1, os.cpu_count() or 1)
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # The intra-op pool busy-waits for work between runs by default; in a worker that does Redis and
        # broker I/O between runs, next to other processes, that spinning burns CPU they need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=chosen)
        active = self.session.get_providers()
        self.provider = _SHORT.get(active[0], active[0])
        if missing or self.provider != self.wanted[0]:
            log.warning(
                "node %s: execution provider %s is not available here (available: %s); running %s on %s",
                self.node_id, self.wanted[0], ", ".join(available), self.model_path.name, self.provider,
            )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.model_info = {
            "name": meta.get("streamd.name", self.model_path.stem),
            "version": meta.get("streamd.version", meta.get("version", "0")),
        }
        self.threshold = float(meta.get("streamd.threshold", self.threshold))
        if "streamd.map_threshold" in meta:
            self.map_threshold = float(meta["streamd.map_threshold"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.input_dtype = _DTYPES.get(inp.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        unknown = [n for n in self.half_outputs if n not in self.output_names]
        if unknown:
            raise TopologyError(f"half_outputs names {', '.join(unknown)}, which {self.model_path.name} does not "
                                f"output (it outputs {', '.join(self.output_names)})",
                                path=f"nodes.{self.node_id}.params.half_outputs")
        for _ in range(self.warmup):
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in self.input_shape]
            self.session.run(None, {self.input_name: np.zeros(dims, dtype=self.input_dtype)})
        log.info("node %s: loaded %s %s on %s (%d threads)", self.node_id, self.model_info["name"],
                 self.model_info["version"], self.provider, threads)

    # -- inference ---------------------------------------------------------------
    def _tensor(self, value: Any) -> tuple[np.ndarray, dict[str, Any]]:
        context: dict[str, Any] = {}
        if isinstance(value, Mapping):
            if self.input_key not in value:
                raise ModelInputMismatch(f"parent output has no {self.input_key!r} key (has {', '.join(value)})",
                                         node=self.node_id)
            context = {k: v for k, v in value.items() if k != self.input_key}
            value = value[self.input_key]
        arr = np.asarray(value)
        want = self.input_shape[1:]
        bad_rank = arr.ndim != len(want)
        if bad_rank or any(isinstance(d, int) and d > 0 and d != a for d, a in zip(want, arr.shape, strict=False)):
            raise ModelInputMismatch(
                f"tensor of shape {list(arr.shape)} does not fit {self.model_path.name} input "
                f"{self.input_name!r} of shape {self.input_shape} (batch dimension first)",
                node=self.node_id,
            )
        if arr.dtype != self.input_dtype:
            if not np.can_cast(arr.dtype, self.input_dtype, casting="same_kind"):
                raise ModelInputMismatch(f"tensor dtype {arr.dtype} cannot feed model input of {self.input_dtype}",
                                         node=self.node_id)
            arr = arr.astype(self.input_dtype)
        return arr, context

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        return self.process_batch([run], [inputs])[0]

    def process_batch(self, runs: Sequence[RunContext], inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
        if self.session is None:
            self.setup()
        prepared = [self._tensor(next(iter(i.values()))) for i in inputs]
        results: list[Any] = []
        for start in range(0, len(prepared), self.max_batch):
            chunk = prepared[start:start + self.max_batch]
            batch = np.stack([t for t, _ in chunk])
            t0 = time.perf_counter()
            outs = self.session.run(None, {self.input_name: batch})
            elapsed = time.perf_counter() - t0
            outs = [o.astype(np.float16) if name in self.half_outputs and o.dtype.kind == "f" else o
                    for name, o in zip(self.output_names, outs, strict=True)]
            m = self.env.metrics
            if m is not None:
                m.inference_duration.labels(self.model_info["name"], self.provider).observe(elapsed)
                m.inference_batch_size.labels(self.model_info["name"]).observe(len(chunk))
            for j, (_, context) in enumerate(chunk):
                results.append({
                    "outputs": {name: out[j] for name, out in zip(self.output_names, outs, strict=True)},
                    "model": dict(self.model_info),
                    "threshold": self.threshold,
                    "map_threshold": self.map_threshold,
                    "context": context,
                })
        return results
