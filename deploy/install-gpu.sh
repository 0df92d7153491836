#!/bin/sh
# Install streamd with GPU inference (onnxruntime-gpu) into one Python environment.
#
# This script is the single source of truth for a GPU install: the Dockerfile's
# `gpu` target runs it, and the README's "GPU workers" section points here.
#
# Why a script: `onnxruntime` (CPU) and `onnxruntime-gpu` install the same
# Python module, `onnxruntime`. With both installed, whichever was installed
# last wins file by file, and removing one later deletes files the other needs.
# streamd depends on the CPU wheel (so that a plain `pip install .` works
# anywhere), so a GPU install is:
#
#   1. install streamd and its dependencies    (this pulls the CPU wheel)
#   2. remove every onnxruntime distribution   (CPU and any earlier GPU wheel)
#   3. install the GPU wheel named by pyproject.toml's `gpu` extra
#   4. check that the CUDA execution provider is compiled in (no GPU needed)
#
# After step 3 `pip check` reports "streamd requires onnxruntime, which is not
# installed": expected, the GPU wheel provides the module.
#
# usage:  deploy/install-gpu.sh [PROJECT_DIR]
#   PROJECT_DIR   the streamd source tree (default: the repository holding this script)
# environment:
#   PYTHON        interpreter of the target environment (default: python3, else python);
#                 use a virtual environment: python -m venv .venv && PYTHON=.venv/bin/python
#   ORT_GPU_SPEC  requirement for the GPU wheel (default: the `gpu` extra in pyproject.toml).
#                 onnxruntime-gpu 1.27 and later are built for CUDA 13 (NVIDIA driver >= 580);
#                 for CUDA 12 hosts use ORT_GPU_SPEC='onnxruntime-gpu>=1.17,<1.27'.
#   PIP_*         passed to pip as usual (PIP_INDEX_URL, PIP_NO_CACHE_DIR, ...)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
project=${1:-"$here/.."}
if [ -z "${PYTHON:-}" ]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

if [ ! -f "$project/pyproject.toml" ]; then
    echo "install-gpu.sh: no pyproject.toml in '$project'; pass the streamd source tree" >&2
    exit 2
fi

# The GPU requirement, from pyproject.toml ([project.optional-dependencies] gpu).
spec=${ORT_GPU_SPEC:-}
if [ -z "$spec" ]; then
    spec=$("$PYTHON" - "$project/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    gpu = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
wheels = [r for r in gpu if r.replace("_", "-").lower().startswith("onnxruntime-gpu")]
if len(wheels) != 1:
    sys.exit(f"install-gpu.sh: the gpu extra must name onnxruntime-gpu exactly once, got {gpu}")
print(wheels[0])
EOF
)
fi
case $spec in
    onnxruntime-gpu*|onnxruntime_gpu*) ;;
    *) echo "install-gpu.sh: ORT_GPU_SPEC must be an onnxruntime-gpu requirement, got '$spec'" >&2; exit 2 ;;
esac

echo "install-gpu.sh: 1/4 pip install $project"
"$PYTHON" -m pip install "$project"

echo "install-gpu.sh: 2/4 removing the CPU onnxruntime wheel"
"$PYTHON" -m pip uninstall -y onnxruntime onnxruntime-gpu

echo "install-gpu.sh: 3/4 pip install '$spec'"
"$PYTHON" -m pip install "$spec"

echo "install-gpu.sh: 4/4 checking the CUDA execution provider"
"$PYTHON" - <<'EOF'
import onnxruntime as ort
providers = ort.get_available_providers()
if "CUDAExecutionProvider" not in providers:
    raise SystemExit(f"install-gpu.sh: onnxruntime {ort.__version__} has no CUDAExecutionProvider: {providers}")
print(f"install-gpu.sh: onnxruntime {ort.__version__}, providers {providers}")
EOF
