"""No drift between the deployment files and streamd itself.

* every STREAMD_* variable they set is one streamd reads (streamd.config.VARIABLES);
* the ports they probe, expose and scrape are the metrics port;
* the commands they run are real `streamd` subcommands and options;
* the Dockerfile installs streamd as the README does (`pip install .`, deploy/install-gpu.sh)
  and installs no dependency that pyproject.toml does not name;
* what the images copy exists, is not excluded by .dockerignore, and holds the models
  the topology names where STREAMD_MODELS_DIR points.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
INSTALL_GPU = ROOT / "deploy" / "install-gpu.sh"

STREAMD_VAR = re.compile(r"\bSTREAMD_[A-Z0-9_]+\b")


# -- Dockerfile parsing -------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    stage = ""
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, flags=re.IGNORECASE)
            stage = m[1] if m else ""
        out.append((stage, instr, args.strip()))
    return out


def stage_of(name: str) -> list[tuple[str, str]]:
    return [(i, a) for s, i, a in dockerfile_instructions() if s == name]


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return value


def env_names(args: str) -> set[str]:
    return set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + args))


# -- collectors ---------------------------------------------------------------------


def _compose_files() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(COMPOSE_DIR.glob("compose*.yaml"))}


def _k8s_docs() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for p in sorted(K8S.rglob("*.yaml")):
        if p.name in ("kustomization.yaml", "topology.yaml"):
            continue
        docs[str(p.relative_to(ROOT))] = [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def _walk(node: Any, key: str):
    """Every value stored under `key`, anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def streamd_vars_set() -> dict[str, set[str]]:
    """file -> the STREAMD_* variables it sets."""
    found: dict[str, set[str]] = {}
    names = set()
    for _, instr, args in dockerfile_instructions():
        if instr in ("ENV", "ARG"):
            names |= {n for n in env_names(args) if n.startswith("STREAMD_")}
    found["Dockerfile"] = names
    for fname, doc in _compose_files().items():
        names = set()
        for env in _walk(doc, "environment"):
            keys = env.keys() if isinstance(env, dict) else (e.split("=", 1)[0] for e in env)
            names |= {k for k in keys if k.startswith("STREAMD_")}
        found[f"deploy/compose/{fname}"] = names
    for fname, docs in _k8s_docs().items():
        names = set()
        for doc in docs:
            for env in _walk(doc, "env"):
                if isinstance(env, list):
                    names |= {e["name"] for e in env if isinstance(e, dict) and "name" in e}
            for v in _walk(doc, "bootstrapServersFromEnv"):
                names.add(v)
        found[fname] = {n for n in names if n.startswith("STREAMD_")}
    env_file = K8S / "base" / "streamd.env"
    found[str(env_file.relative_to(ROOT))] = {
        line.split("=", 1)[0].strip()
        for line in env_file.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    # Any STREAMD_* word in the docs of these files, too (comments name variables).
    operations = ROOT / "docs" / "operations.md"
    for path in (DOCKERFILE, INSTALL_GPU, *COMPOSE_DIR.glob("*"), *K8S.rglob("*.yaml"), env_file, operations):
        if path.is_file() and path.name != "topology.yaml":
            found.setdefault(str(path.relative_to(ROOT)), set()).update(STREAMD_VAR.findall(path.read_text()))
    return found


# -- tests --------------------------------------------------------------------------


def test_every_streamd_variable_is_one_streamd_reads(variables) -> None:
    unknown = {f: sorted(n - set(variables)) for f, n in streamd_vars_set().items() if n - set(variables)}
    assert not unknown, f"not in streamd.config.VARIABLES: {unknown}"


def test_env_files_are_complete_assignments(variables) -> None:
    for line in (K8S / "base" / "streamd.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep and name in variables and value == value.strip(), line


def test_ports_are_the_metrics_port(default_metrics_port, compose) -> None:
    port = default_metrics_port
    for stage in ("cpu", "gpu"):
        instrs = stage_of(stage)
        expose = [a for i, a in instrs if i == "EXPOSE"]
        assert expose == [str(port)], f"{stage}: EXPOSE {expose}"
        envs = " ".join(a for i, a in instrs if i == "ENV")
        assert f"STREAMD_METRICS_PORT={port}" in envs
        (health,) = [a for i, a in instrs if i == "HEALTHCHECK"]
        assert "/healthz" in health and f"'{port}'" in health, "HEALTHCHECK falls back to the default port"
    for name in ("ingest", "worker-cpu", "worker-gpu"):
        assert compose["services"][name]["environment"]["STREAMD_METRICS_PORT"] == str(port)
    assert f"{port}:{port}" in compose["services"]["ingest"]["ports"]
    env = dict(
        line.split("=", 1)
        for line in (K8S / "base" / "streamd.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["STREAMD_METRICS_PORT"] == str(port)
    for fname, docs in _k8s_docs().items():
        for doc in docs:
            for ports in _walk(doc, "ports"):
                for p in ports:
                    if isinstance(p, dict) and p.get("name") == "metrics":
                        assert p.get("containerPort", p.get("port")) == port, fname


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `streamd`) for every streamd invocation in the deployment files."""
    out = []
    for stage in ("cpu", "gpu"):
        instrs = stage_of(stage)
        (entry,) = [exec_form(a) for i, a in instrs if i == "ENTRYPOINT"]
        assert entry == ["streamd"], f"{stage}: ENTRYPOINT {entry}"
        (cmd,) = [exec_form(a) for i, a in instrs if i == "CMD"]
        out.append((f"Dockerfile:{stage}", cmd))
    for fname, doc in _compose_files().items():
        for name, svc in (doc.get("services") or {}).items():
            if "command" in svc and "build" in svc:  # the services built from this repository
                out.append((f"{fname}:{name}", svc["command"]))
    for fname, docs in _k8s_docs().items():
        for doc in docs:
            for c in _walk(doc, "containers"):
                for container in c:
                    if "args" in container:
                        assert container.get("command") in (None, ["streamd"]), fname
                        out.append((f"{fname}:{container['name']}", container["args"]))
    return out


def test_commands_are_streamd_subcommands(subcommands, subcommand_options) -> None:
    commands = _commands()
    assert len(commands) >= 6
    for where, argv in commands:
        assert argv[0] in subcommands, f"{where}: `streamd {argv[0]}` is not a subcommand ({sorted(subcommands)})"
        options = subcommand_options(argv[0])
        used = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
        if options is not None:
            assert used <= options, f"{where}: `streamd {argv[0]}` has no option {sorted(used - options)}"
        if argv[0] in ("run", "worker"):
            assert argv[1] == "/etc/streamd/topology.yaml", where


def _pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in a shell text."""
    out = []
    for m in re.finditer(r"\bpip3?\s+install\b([^;&|\n]*)", text):
        out.append(shlex.split(m[1], comments=False))
    return out


def test_dockerfile_installs_like_the_readme(pyproject) -> None:
    build = " ".join(a for i, a in stage_of("build") if i == "RUN")
    assert re.search(r"\bpip install \.(\s|$)", build), "the CPU image runs `pip install .`"
    gpu_build = stage_of("gpu-build")
    copies = [a for i, a in gpu_build if i == "COPY"]
    assert "deploy/install-gpu.sh deploy/install-gpu.sh" in copies
    runs = " ".join(a for i, a in gpu_build if i == "RUN")
    assert "deploy/install-gpu.sh" in runs and "pip install" not in runs, (
        "the GPU image installs through deploy/install-gpu.sh only"
    )
    # The runtime images copy the virtual environment and install nothing.
    for stage in ("cpu", "gpu"):
        assert not any("pip" in a for i, a in stage_of(stage) if i == "RUN"), stage
    readme = ROOT / "README.md"
    if readme.exists() and "onnxruntime-gpu" in readme.read_text():
        assert "deploy/install-gpu.sh" in readme.read_text(), "README's GPU install should use deploy/install-gpu.sh"


def _normalise(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_no_dependency_installed_by_name_outside_pyproject(pyproject) -> None:
    project = pyproject["project"]
    declared = {_normalise(r) for r in project["dependencies"]}
    for reqs in project.get("optional-dependencies", {}).values():
        declared |= {_normalise(r) for r in reqs}
    texts = {
        "Dockerfile": "\n".join(a for _, i, a in dockerfile_instructions() if i == "RUN"),
        "deploy/install-gpu.sh": "\n".join(
            line for line in INSTALL_GPU.read_text().splitlines() if not line.lstrip().startswith(("#", "echo "))
        ),
    }
    for where, text in texts.items():
        for args in _pip_installs(text):
            for arg in args:
                if arg.startswith(("-", "$", '"$', ".", "/")) or arg in ("\\",):
                    continue  # options, variables, paths
                assert _normalise(arg) in declared, f"{where}: installs {arg!r}, which pyproject.toml does not name"
        for m in re.finditer(r"\bpip3?\s+uninstall\s+-y\s+([^\n;&|]*)", text):
            for name in shlex.split(m[1]):
                assert _normalise(name) in declared | {"onnxruntime"}, f"{where}: uninstalls {name}"


def test_install_gpu_script_swaps_onnxruntime(pyproject) -> None:
    text = INSTALL_GPU.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert INSTALL_GPU.stat().st_mode & 0o111, "deploy/install-gpu.sh must be executable"
    steps = [text.index(s) for s in ('pip install "$project"', "pip uninstall -y onnxruntime", 'pip install "$spec"')]
    assert steps == sorted(steps), "install streamd, then remove onnxruntime, then install onnxruntime-gpu"
    assert "CUDAExecutionProvider" in text
    gpu = pyproject["project"]["optional-dependencies"]["gpu"]
    assert [_normalise(r) for r in gpu] == ["onnxruntime-gpu"], "the script reads the gpu extra's one requirement"


def test_install_gpu_script_parses() -> None:
    import shutil
    import subprocess

    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    out = subprocess.run([sh, "-n", str(INSTALL_GPU)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -- what the images copy -----------------------------------------------------------


def _dockerignore() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def _ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches too."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in rules:
        pat = pattern.replace("**/", "*/") if pattern.startswith("**/") else pattern
        hit = any(
            fnmatch.fnmatch(p, pattern)
            or fnmatch.fnmatch(p, pat)
            or (pattern.startswith("**/") and fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern[3:]))
            for p in prefixes
        )
        if hit:
            ignored = not negate
    return ignored


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    rules = _dockerignore()
    # Nothing a developer keeps locally goes into the context.
    for path in (".git", ".venv", "tests", "deploy/k8s/secret.example.yaml", "streamd/__pycache__"):
        assert _ignored(path, rules), f".dockerignore should exclude {path}"
    missing_readme = False
    for stage, instr, args in dockerfile_instructions():
        if instr != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in sources:
            path = src.rstrip("/")
            assert not _ignored(path, rules), f"{stage}: COPY {src} is excluded by .dockerignore"
            if path == "README.md" and not (ROOT / path).exists():
                missing_readme = True
                continue
            assert (ROOT / path).exists(), f"{stage}: COPY {src}: no such path in the repository"
    if missing_readme:
        pytest.skip("README.md (pyproject's readme, copied for `pip install .`) does not exist yet")


def test_models_resolve_where_the_images_put_them(topology) -> None:
    """The images hold models/ under /app and set STREAMD_MODELS_DIR=/app (the repository root's layout)."""
    for stage in ("cpu", "gpu"):
        instrs = stage_of(stage)
        envs = " ".join(a for i, a in instrs if i == "ENV")
        assert "STREAMD_MODELS_DIR=/app" in envs
        assert ("WORKDIR", "/app") in instrs
        copies = [a for i, a in instrs if i == "COPY"]
        assert "models/ models/" in copies and "topologies/ topologies/" in copies
        assert "topologies/surface-inspection.yaml /etc/streamd/topology.yaml" in copies
    assert topology.model_paths, "the topology names no model"
    for model in topology.model_paths:
        assert not Path(model).is_absolute(), f"{model}: use a path relative to STREAMD_MODELS_DIR"
        assert (ROOT / model).is_file(), f"{model} does not resolve against STREAMD_MODELS_DIR=/app (the repo root)"
        assert model.startswith("models/"), f"{model}: the images copy models/ only"


def test_images_run_as_non_root() -> None:
    for stage in ("cpu", "gpu"):
        users = [a for i, a in stage_of(stage) if i == "USER"]
        assert users == ["10001:10001"], stage
    froms = [a for _, i, a in dockerfile_instructions() if i == "FROM"]
    assert froms[-1].endswith(" AS cpu"), "the CPU image is the default target: keep it the last stage"


# -- docs/operations.md -------------------------------------------------------------


def _dashboard_table() -> list[list[str]]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Read the dashboard") :]
    section = section[: section.index("\n## ", 1)]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not set(r[0]) <= {"-"}]


def test_operations_doc_names_real_panels_and_metrics() -> None:
    import json

    dashboard = ROOT / "deploy" / "grafana" / "dashboards" / "streamd.json"
    if not dashboard.exists():
        pytest.skip("deploy/grafana/dashboards/streamd.json does not exist yet")
    panels: set[tuple[str, str]] = set()
    row = ""

    def walk(items: list[dict[str, Any]]) -> None:
        nonlocal row
        for p in items:
            if p.get("type") == "row":
                row = p.get("title", "")
            else:
                panels.add((row, p.get("title", "")))
            walk(p.get("panels") or [])

    walk(json.loads(dashboard.read_text())["panels"])
    from prometheus_client import CollectorRegistry

    from streamd.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    metrics = {m.name for m in registry.collect()} | {"up"}
    table = _dashboard_table()
    assert table
    for row_title, panel, metric, _ in table:
        assert (row_title, panel) in panels, (
            f"docs/operations.md names a panel the dashboard lacks: {row_title} / {panel}"
        )
        for name in re.findall(r"`([a-z_]+)`", metric):
            base = re.sub(r"_total$", "", name)
            assert name in metrics or base in metrics, f"docs/operations.md: no metric {name}"
