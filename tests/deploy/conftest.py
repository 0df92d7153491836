"""Fixtures for the static checks of the deployment files (Dockerfile, compose, Kubernetes).

Nothing here needs a Docker engine or a cluster. The tools the checks use are
looked up on PATH (docker-compose, kubectl or kustomize) or imported from the
environment (kubernetes-validate); a check whose tool is missing is skipped
with a message naming the package that provides it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
TOPOLOGY_FILE = ROOT / "topologies" / "surface-inspection.yaml"

#: The streamd subcommands named in the design, used when the CLI cannot be asked.
KNOWN_SUBCOMMANDS = frozenset({"run", "worker", "validate", "demo", "tp"})


@dataclass(frozen=True)
class TopologyFacts:
    """What the deployment files must agree with, read from the topology YAML."""

    name: str
    source_partitions: dict[str, int]
    topics: dict[str, int]
    queues: frozenset[str]
    model_paths: tuple[str, ...]

    @property
    def group_id(self) -> str:
        return f"streamd-{self.name}"

    def celery_queue(self, queue: str) -> str:
        return f"streamd.{self.name}.{queue}"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def topology_facts(path: Path) -> TopologyFacts:
    """Parse the parts of a topology the deployment depends on (defaults as in streamd.topology)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    sources = {s["topic"]: int(s.get("partitions") or 3) for s in data["sources"]}
    topics = dict(sources)
    for sink in (data.get("sinks") or {}).values():
        topics.setdefault(sink["topic"], int(sink.get("partitions") or 3))
    nodes = data.get("nodes") or {}
    queues = frozenset((spec or {}).get("queue") or "cpu" for spec in nodes.values())
    models = tuple(
        s for spec in nodes.values() for s in _strings((spec or {}).get("params") or {}) if s.endswith(".onnx")
    )
    return TopologyFacts(data["name"], sources, topics, queues, models)


@pytest.fixture(scope="session")
def topology() -> TopologyFacts:
    if not TOPOLOGY_FILE.exists():
        pytest.skip(f"{TOPOLOGY_FILE.relative_to(ROOT)} does not exist yet")
    return topology_facts(TOPOLOGY_FILE)


@pytest.fixture(scope="session")
def variables() -> dict[str, str]:
    """STREAMD_* name -> default, from streamd.config.VARIABLES."""
    from streamd.config import VARIABLES

    return {v.name: v.default for v in VARIABLES}


@pytest.fixture(scope="session")
def default_metrics_port(variables: dict[str, str]) -> int:
    return int(variables["STREAMD_METRICS_PORT"])


@pytest.fixture(scope="session")
def default_drain_s(variables: dict[str, str]) -> float:
    return float(variables["STREAMD_DRAIN_TIMEOUT_S"])


def _help(*args: str) -> str | None:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "streamd", *args, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.fixture(scope="session")
def subcommands() -> frozenset[str]:
    """streamd's subcommands, from `streamd --help` when the CLI runs, else the design's list."""
    text = _help()
    if text is None:
        return KNOWN_SUBCOMMANDS
    found = set(re.findall(r"^ {4}([a-z][a-z0-9-]*) {2,}", text, flags=re.MULTILINE))
    return frozenset(found) or KNOWN_SUBCOMMANDS


@pytest.fixture(scope="session")
def subcommand_options():
    """subcommand -> the --options its help lists (None when the CLI cannot be asked)."""
    cache: dict[str, frozenset[str] | None] = {}

    def options(command: str) -> frozenset[str] | None:
        if command not in cache:
            text = _help(command)
            cache[command] = None if text is None else frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", text))
        return cache[command]

    return options


@pytest.fixture(scope="session")
def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# -- compose -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def compose_cmd() -> list[str]:
    """docker-compose (Debian package docker-compose), else the `docker compose` plugin."""
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("docker-compose is not installed (Debian package: docker-compose)")


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """compose.yaml, parsed (YAML merge keys resolved by PyYAML)."""
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def compose_gpu() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text(encoding="utf-8"))


# -- kubernetes --------------------------------------------------------------------


def _kubectl_minor(exe: str) -> int:
    out = subprocess.run([exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    try:
        minor = re.match(r"\d+", json.loads(out.stdout)["clientVersion"]["minor"])
    except (ValueError, KeyError, TypeError):
        return 0
    return int(minor[0]) if minor else 0


def kustomize_command() -> tuple[list[str] | None, str]:
    """A standalone kustomize, else `kubectl kustomize` from kubectl >= 1.21 (which embeds kustomize v4+)."""
    exe = shutil.which("kustomize")
    if exe:
        return [exe, "build"], ""
    exe = shutil.which("kubectl")
    if not exe:
        return None, "neither kustomize nor kubectl is on PATH (kubectl >= 1.21 is needed)"
    minor = _kubectl_minor(exe)
    if minor < 21:
        return None, (
            f"{exe} is kubectl 1.{minor}: its embedded kustomize (v2) cannot render these overlays; "
            "kubectl >= 1.21 is needed (Debian bookworm's kubernetes-client is 1.20)"
        )
    return [exe, "kustomize"], ""


def kustomize(path: Path) -> list[dict[str, Any]]:
    cmd, why = kustomize_command()
    if cmd is None:
        pytest.skip(why)
    env = {**os.environ, "KUBECONFIG": os.devnull}  # rendering needs no cluster
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def render():
    """kustomize(path) -> the rendered objects."""
    return kustomize


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """overlay name -> the rendered objects (rendered once per session)."""
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def secret_example() -> dict[str, Any]:
    return yaml.safe_load((K8S / "secret.example.yaml").read_text(encoding="utf-8"))
