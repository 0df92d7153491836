# streamd container images: one Dockerfile, two targets.
#
#   CPU (default):  docker build -t streamd:0.1.0 .
#   GPU:            docker build --target gpu -t streamd:0.1.0-gpu .
#
# Both images:
#   * run as the non-root user `streamd` (uid/gid 10001);
#   * hold the project's topologies/ and models/ under /app, with
#     STREAMD_MODELS_DIR=/app, so a model path written `models/...` in a
#     topology resolves to /app/models/...;
#   * ship topologies/surface-inspection.yaml as /etc/streamd/topology.yaml
#     (compose and Kubernetes mount their own topology over it);
#   * serve /metrics, /healthz and /readyz on STREAMD_METRICS_PORT (9100);
#   * have ENTRYPOINT `streamd`, so arguments are streamd subcommands:
#       docker run streamd:0.1.0                                   # run /etc/streamd/topology.yaml
#       docker run streamd:0.1.0 worker /etc/streamd/topology.yaml --queues cpu
#       docker run streamd:0.1.0 validate /app/topologies/surface-inspection.yaml
#
# The GPU image is built on NVIDIA's CUDA + cuDNN runtime image and installs
# onnxruntime-gpu in place of onnxruntime with deploy/install-gpu.sh (the same
# script the README uses). The default onnxruntime-gpu is built for CUDA 13
# (NVIDIA driver >= 580). For CUDA 12 hosts:
#   docker build --target gpu \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg ORT_GPU_SPEC='onnxruntime-gpu>=1.17,<1.27' -t streamd:0.1.0-gpu-cuda12 .
#
# Build with BuildKit (the default builder since Docker 23, and the one
# `docker compose` uses): the classic builder would also build the GPU stages
# when asked for the default CPU target, which is the last stage below.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# CPU build stage: a virtual environment with streamd and its dependencies.
# Every dependency has a binary wheel, so no compiler is needed.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamd/ streamd/
RUN pip install .

# ---------------------------------------------------------------------------
# GPU build stage: same, on the CUDA image's Python, with onnxruntime-gpu.
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamd/ streamd/
COPY deploy/install-gpu.sh deploy/install-gpu.sh
# Empty: the requirement comes from pyproject.toml's `gpu` extra.
ARG ORT_GPU_SPEC=
RUN PYTHON=/opt/venv/bin/python ORT_GPU_SPEC="$ORT_GPU_SPEC" sh deploy/install-gpu.sh /src

# ---------------------------------------------------------------------------
# GPU runtime image:  docker build --target gpu ...
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 streamd \
    && useradd --system --uid 10001 --gid streamd --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin streamd
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMD_MODELS_DIR=/app \
    STREAMD_METRICS_PORT=9100
WORKDIR /app
COPY topologies/ topologies/
COPY models/ models/
COPY topologies/surface-inspection.yaml /etc/streamd/topology.yaml
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('STREAMD_METRICS_PORT') or '9100'), timeout=4)"]
ENTRYPOINT ["streamd"]
# The GPU image exists for the gpu queue.
CMD ["worker", "/etc/streamd/topology.yaml", "--queues", "gpu"]

# ---------------------------------------------------------------------------
# CPU runtime image (default target; keep it the last stage).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 streamd \
    && useradd --system --uid 10001 --gid streamd --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin streamd
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMD_MODELS_DIR=/app \
    STREAMD_METRICS_PORT=9100
WORKDIR /app
COPY topologies/ topologies/
COPY models/ models/
COPY topologies/surface-inspection.yaml /etc/streamd/topology.yaml
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('STREAMD_METRICS_PORT') or '9100'), timeout=4)"]
ENTRYPOINT ["streamd"]
CMD ["run", "/etc/streamd/topology.yaml"]
