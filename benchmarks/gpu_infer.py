"""streamd's ONNX model Node on ONNX Runtime's CUDA execution provider against the CPU provider.

    python benchmarks/gpu_infer.py [--model models/surface-ae/model.onnx] [--batches 1,8,16,32,64]
                                   [--runs 200] [--max-seconds 2] [--out benchmarks/results/gpu]

Run from the repository root (``PYTHONPATH=.`` if streamd is not installed). It needs numpy and
onnxruntime only; for the CUDA provider that is the ``onnxruntime-gpu`` wheel (see deploy/install-gpu.sh)
with the CUDA and cuDNN libraries it links against findable by the dynamic loader. Without a usable CUDA
provider it says so and measures the CPU provider alone.

What it measures, for batch sizes 1, 8, 16, 32, 64 of the model's real input (grey 128x128 frames made by
``streamd.synth.camera_frame`` and pre-processed by the ``image.preprocess`` Node, as
topologies/surface-inspection.yaml does; random float32 in [0, 1] if streamd does not import):

* the latency of one ``session.run`` (numpy in, numpy out: host-device copies included, as in the Node),
  p50 / p99 / mean, and frames per second, for sessions made with the Node's own options on
  ``cuda`` (CUDA provider, CPU as fallback), ``cpu-1t`` (CPU provider, 1 intra-op thread) and
  ``cpu-all`` (CPU provider, one intra-op thread per core);
* how far CUDA's outputs are from the CPU provider's on the same batch (max abs / relative difference,
  and whether every frame gets the same verdict against the model's threshold);
* if streamd imports: the real ``onnx.model`` Node built through streamd, with ``providers: [cuda, cpu]``
  (it must report provider ``cuda`` where CUDA works) and with ``STREAMD_ONNX_PROVIDERS=cpu`` (it must
  report ``cpu``), and the latency of its ``process_batch`` at the topology's batch sizes.

The table goes to stdout and to OUT/report.txt, the figures to OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class Report:
    """Prints lines and keeps them for report.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# -- the machine -------------------------------------------------------------------------------
def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(ort: Any) -> dict[str, Any]:
    gpus = []
    smi = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    for line in smi.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2],
                         "compute_capability": parts[3] if len(parts) > 3 else ""})
    cuda_version = ""
    for line in _cmd(["nvidia-smi"]).splitlines():
        if "CUDA Version" in line:
            cuda_version = line.split("CUDA Version:")[1].strip(" |")
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "gpus": gpus,
        "driver_cuda_version": cuda_version,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_file": str(Path(ort.__file__).parent),
        "onnxruntime_device": ort.get_device(),
        "available_providers": ort.get_available_providers(),
    }


def loaded_cuda_libs() -> list[str]:
    """The CUDA libraries this process has mapped (which copies the CUDA provider actually uses)."""
    libs: set[str] = set()
    keys = ("libcudart", "libcublas", "libcudnn", "libcurand", "libcufft", "libnvrtc", "libcuda.so",
            "libonnxruntime_providers")
    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if any(k in path for k in keys):
                libs.add(path)
    return sorted(libs)


# -- the input -----------------------------------------------------------------------------------
def make_frames(n: int, shape: list[Any], seed: int) -> tuple[np.ndarray, str]:
    """``n`` model inputs (C x H x W float32): streamd's synthetic camera frames, pre-processed as
    the surface-inspection topology does; random ones if streamd does not import."""
    chw = [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    rng = np.random.default_rng(seed)
    try:
        from streamd.config import Settings
        from streamd.nodes.base import NodeEnv, Origin, RunContext
        from streamd.nodes.image import Preprocess
        from streamd.synth import DEFECT_KINDS, camera_frame

        env = NodeEnv(settings=Settings(), topology_name="gpu-infer", base_dir=ROOT / "topologies")
        pre = Preprocess("preprocess", {"size": [chw[1], chw[2]], "grayscale": chw[0] == 1}, env)
        out = []
        for i in range(n):
            defect = DEFECT_KINDS[i % len(DEFECT_KINDS)] if i % 4 == 3 else None
            img, _ = camera_frame(rng, defect=defect, size=(chw[1], chw[2]), channels=1)
            run = RunContext(topology="gpu-infer", run_id=f"r{i}", origin=Origin("bench", 0, i), kind="frame")
            out.append(pre.process(run, {"decode": img})["tensor"])
        return np.stack(out).astype(np.float32), "streamd.synth.camera_frame + image.preprocess (1 in 4 defective)"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to random input
        return (rng.random((n, *chw), dtype=np.float32),
                f"random float32 in [0, 1] (streamd frames unavailable: {type(exc).__name__}: {exc})")


# -- sessions and timing ---------------------------------------------------------------------------
def make_session(ort: Any, model: Path, providers: list[str], threads: int) -> Any:
    """A session with the options streamd's onnx.model Node uses (streamd/nodes/onnx.py)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), sess_options=opts, providers=providers)


def time_calls(fn: Callable[[], Any], runs: int, max_seconds: float, warmup: int, min_runs: int = 20) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    lat: list[float] = []
    start = time.perf_counter()
    while len(lat) < runs:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
        if len(lat) >= min_runs and time.perf_counter() - start >= max_seconds:
            break
    ms = np.array(lat) * 1e3
    return {"runs": len(lat), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "total_s": float(ms.sum() / 1e3)}


def compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str], threshold: float | None,
            score_index: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, a, b in zip(names, ref, got, strict=True):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = float(np.abs(a).max()) or 1.0
        out[name] = {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max() / scale),
                     "max_abs_ref": scale, "allclose_rtol1e-3_atol1e-4": bool(np.allclose(b, a, rtol=1e-3, atol=1e-4))}
    if threshold is not None and score_index is not None:
        va, vb = ref[score_index] > threshold, got[score_index] > threshold
        out["verdicts"] = {"threshold": threshold, "same": int((va == vb).sum()), "of": int(va.size),
                           "anomalous_cpu": int(va.sum()), "anomalous_other": int(vb.sum())}
    return out


# -- streamd's Node ----------------------------------------------------------------------------------
def node_checks(model: Path, frames: np.ndarray, batches: list[int], runs: int, max_seconds: float,
                warmup: int, say: Report) -> dict[str, Any]:
    try:
        from streamd.config import Settings
        from streamd.nodes.base import NodeEnv, Origin, RunContext
        from streamd.nodes.onnx import OnnxModel
    except Exception as exc:  # noqa: BLE001 - report and carry on
        say(f"streamd does not import here ({type(exc).__name__}: {exc}); Node checks skipped")
        return {"skipped": f"{type(exc).__name__}: {exc}"}

    log_buf = io.StringIO()
    handler = logging.StreamHandler(log_buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("streamd").addHandler(handler)
    logging.getLogger("streamd").setLevel(logging.INFO)
    result: dict[str, Any] = {}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_ONNX_")}
    params = {"model": str(model), "providers": ["cuda", "cpu"], "max_batch": 32}
    outputs: dict[str, list[Any]] = {}
    cases: tuple[tuple[str, dict[str, str]], ...] = (
        ("providers [cuda, cpu]", {}),
        ("STREAMD_ONNX_PROVIDERS=cpu", {"STREAMD_ONNX_PROVIDERS": "cpu"}),
    )
    for label, extra in cases:
        log_buf.truncate(0)
        log_buf.seek(0)
        entry: dict[str, Any] = {}
        try:
            settings = Settings.from_env({**base_env, **extra})
            env = NodeEnv(settings=settings, topology_name="gpu-infer", base_dir=ROOT / "topologies")
            node = OnnxModel("autoencoder", params, env)
            t0 = time.perf_counter()
            node.setup()
            entry["setup_s"] = round(time.perf_counter() - t0, 3)
            entry["provider"] = node.provider
            entry["session_providers"] = node.session.get_providers()
            runs_ctx = [RunContext(topology="gpu-infer", run_id=f"n{i}", origin=Origin("bench", 0, i), kind="frame")
                        for i in range(max(batches))]
            inputs = [{"preprocess": {"tensor": frames[i % len(frames)], "orig_size": [128, 128]}}
                      for i in range(max(batches))]
            outputs[label] = node.process_batch(runs_ctx[:16], inputs[:16])
            timing = {}
            for b in (16, 32):
                if b > len(inputs):
                    continue
                call = functools.partial(node.process_batch, runs_ctx[:b], inputs[:b])
                stats = time_calls(call, runs, max_seconds, warmup)
                stats["frames_per_s"] = b * stats["runs"] / stats["total_s"]
                timing[str(b)] = stats
            entry["process_batch"] = timing
        except Exception as exc:  # noqa: BLE001 - report and carry on
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["log"] = [line for line in log_buf.getvalue().splitlines() if line]
        result[label] = entry
    logging.getLogger("streamd").removeHandler(handler)
    if len(outputs) == 2:
        a, b = outputs["STREAMD_ONNX_PROVIDERS=cpu"], outputs["providers [cuda, cpu]"]
        result["score_max_abs_diff"] = float(max(abs(float(x["outputs"]["score"]) - float(y["outputs"]["score"]))
                                                 for x, y in zip(a, b, strict=True)))
    return result


# -- main --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "surface-ae" / "model.onnx"))
    ap.add_argument("--batches", default="1,8,16,32,64", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per batch size (at most)")
    ap.add_argument("--max-seconds", type=float, default=2.0, help="stop a batch size after this long (>= 20 runs)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per batch size")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    ap.add_argument("--no-node", action="store_true", help="skip the streamd Node checks")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    model = Path(args.model)
    say = Report()

    import onnxruntime as ort

    info = machine_info(ort)
    say("== machine")
    for g in info["gpus"] or [{"name": "none (nvidia-smi not found or no GPU)", "driver": "-", "memory": "-",
                               "compute_capability": "-"}]:
        say(f"GPU        {g['name']}, driver {g['driver']}, {g['memory']}, compute capability "
            f"{g['compute_capability']}; driver CUDA {info['driver_cuda_version'] or '-'}")
    say(f"CPU        {info['cpu_model']}, {info['cpu_count']} logical cores ({info['cpu_usable']} usable)")
    say(f"software   Python {info['python']}, numpy {info['numpy']}, onnxruntime {info['onnxruntime']} "
        f"({info['onnxruntime_device']}) from {info['onnxruntime_file']}")
    say(f"providers  {', '.join(info['available_providers'])}")

    cores = info["cpu_usable"]
    configs: list[tuple[str, list[str], int]] = [("cpu-1t", [CPU], 1), ("cpu-all", [CPU], cores)]
    cuda_note = ""
    if CUDA in info["available_providers"]:
        configs.insert(0, ("cuda", [CUDA, CPU], cores))
    else:
        cuda_note = f"CUDA execution provider unavailable in this onnxruntime ({info['onnxruntime']}): CPU only"
        say(cuda_note)

    sessions: dict[str, Any] = {}
    for name, providers, threads in configs:
        t0 = time.perf_counter()
        try:
            sess = make_session(ort, model, providers, threads)
        except Exception as exc:  # noqa: BLE001 - report and carry on
            say(f"{name}: session creation failed: {type(exc).__name__}: {exc}")
            continue
        active = sess.get_providers()
        if providers[0] not in active[:1]:
            say(f"{name}: asked for {providers[0]}, session runs on {active} -- not measured")
            cuda_note = cuda_note or f"CUDA provider fell back to {active[0]} at session creation"
            continue
        sessions[name] = sess
        say(f"session    {name}: {active}, intra-op threads {threads}, created in {time.perf_counter() - t0:.2f} s")

    any_sess = next(iter(sessions.values()))
    inp = any_sess.get_inputs()[0]
    out_names = [o.name for o in any_sess.get_outputs()]
    meta = any_sess.get_modelmeta().custom_metadata_map
    threshold = float(meta["streamd.threshold"]) if "streamd.threshold" in meta else None
    score_index = out_names.index("score") if "score" in out_names else None
    frames, frames_from = make_frames(max(batches), list(inp.shape), args.seed)
    say(f"model      {model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}: input {inp.name} "
        f"{inp.shape} {inp.type}; outputs {out_names}; threshold {threshold}")
    say(f"frames     {frames_from}")
    say(f"cuda libs  {', '.join(loaded_cuda_libs()) or '-'}")

    results: dict[str, dict[str, Any]] = {name: {} for name in sessions}
    for name, sess in sessions.items():
        for b in batches:
            feed = {inp.name: np.ascontiguousarray(frames[:b])}
            stats = time_calls(lambda sess=sess, feed=feed: sess.run(None, feed), args.runs, args.max_seconds,
                               args.warmup)
            stats["frames_per_s"] = b * stats["runs"] / stats["total_s"]
            results[name][str(b)] = stats

    say()
    say("== session.run latency per batch (ms) and frames/s; numpy in/out, host<->device copies included")
    names = list(sessions)
    say(f"{'batch':>5} | " + " | ".join(f"{n:^26}" for n in names))
    say(f"{'':>5} | " + " | ".join(f"{'p50':>7} {'p99':>7} {'frames/s':>10}" for _ in names))
    for b in batches:
        cells = []
        for n in names:
            s = results[n][str(b)]
            cells.append(f"{s['p50_ms']:7.3f} {s['p99_ms']:7.3f} {s['frames_per_s']:10.0f}")
        say(f"{b:>5} | " + " | ".join(cells))
    if "cuda" in results:
        for ref in ("cpu-1t", "cpu-all"):
            if ref in results:
                say(f"speed-up of cuda over {ref} (frames/s): " + ", ".join(
                    f"b{b} x{results['cuda'][str(b)]['frames_per_s'] / results[ref][str(b)]['frames_per_s']:.1f}"
                    for b in batches))

    agreement: dict[str, Any] = {}
    if "cuda" in sessions and "cpu-all" in sessions:
        feed = {inp.name: frames}
        agreement = compare(sessions["cpu-all"].run(None, feed), sessions["cuda"].run(None, feed), out_names,
                            threshold, score_index)
        say()
        say(f"== CUDA vs CPU outputs on the same {len(frames)} frames")
        for n in out_names:
            a = agreement[n]
            say(f"{n:>12}: max abs diff {a['max_abs_diff']:.3g} (largest |value| {a['max_abs_ref']:.3g}, "
                f"relative {a['max_rel_diff']:.2g}); allclose(rtol=1e-3, atol=1e-4) {a['allclose_rtol1e-3_atol1e-4']}")
        if "verdicts" in agreement:
            v = agreement["verdicts"]
            say(f"    verdicts: {v['same']}/{v['of']} frames agree against threshold {v['threshold']} "
                f"(anomalous: cpu {v['anomalous_cpu']}, cuda {v['anomalous_other']})")

    node: dict[str, Any] = {}
    if not args.no_node:
        say()
        say("== streamd onnx.model Node (streamd/nodes/onnx.py), built through streamd")
        node = node_checks(model, frames, batches, args.runs, args.max_seconds, args.warmup, say)
        for label, entry in node.items():
            if not isinstance(entry, dict):
                continue
            if "error" in entry:
                say(f"{label}: FAILED {entry['error']}")
                continue
            timing = ", ".join(f"b{b} p50 {s['p50_ms']:.3f} ms / {s['frames_per_s']:.0f} frames/s"
                               for b, s in entry.get("process_batch", {}).items())
            say(f"{label}: provider {entry['provider']!r} (session {entry['session_providers']}); "
                f"setup {entry['setup_s']} s; process_batch {timing}")
            for line in entry.get("log", []):
                say(f"    log: {line}")
        if "score_max_abs_diff" in node:
            say(f"Node score, cuda vs cpu, first 16 frames: max abs diff {node['score_max_abs_diff']:.3g}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": info,
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "input": {"name": inp.name, "shape": list(inp.shape), "type": inp.type},
        "frames": frames_from,
        "session_options": "as streamd's onnx.model Node: ORT_ENABLE_ALL, inter-op 1, intra-op spinning off",
        "method": {"runs_max": args.runs, "max_seconds": args.max_seconds, "warmup": args.warmup,
                   "timer": "time.perf_counter around session.run (numpy in, numpy out)"},
        "cuda_note": cuda_note,
        "cuda_libs_loaded": loaded_cuda_libs(),
        "session_run": results,
        "cuda_vs_cpu": agreement,
        "node": node,
        "argv": sys.argv,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "report.txt").write_text("\n".join(say.lines) + "\n")
    print(f"\nwrote {out / 'report.txt'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
