"""The documentation cannot drift from the code.

* docs/configuration.md lists exactly the variables of ``streamd.config.VARIABLES``
  (with their defaults and secret flags), and only test variables besides;
* docs/topologies.md documents every built-in Node type, and its example Node
  class loads, validates and behaves as the page says;
* docs/reliability.md has a row for every dead-letter reason of ``streamd.tp.REASONS``;
* every relative link in README.md and docs/*.md points to a file (and heading) that exists.

Unit tests: they need no service.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from streamd import tp
from streamd.config import VARIABLES, Settings
from streamd.exceptions import BadInput, TopologyError
from streamd.nodes import base
from streamd.nodes.base import NodeEnv, Origin, RunContext, registered
from streamd.topology import SinkSpec, load, parse

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
TOPOLOGIES = DOCS / "topologies.md"
RELIABILITY = DOCS / "reliability.md"

VAR = re.compile(r"\bSTREAMD_[A-Z0-9_]+")
TEST_PREFIX = "STREAMD_TEST_"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _without_code(text: str) -> str:
    """Markdown text without fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _section(text: str, heading: str) -> str:
    """The body of the section under ``heading`` (a full heading line), up to the next heading of any level
    at or above its own."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n") + len(heading) + 1
    nxt = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start)
    return text[start: nxt.start() if nxt else len(text)]


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows whose first cell is a code span, keyed by that span's text."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m[1]] = [c.strip() for c in m[2].split("|")]
    return rows


# -- configuration.md ------------------------------------------------------------------


def test_configuration_lists_every_variable_and_no_other() -> None:
    text = _read(CONFIGURATION)
    documented = set(VAR.findall(text))
    declared = {v.name for v in VARIABLES}
    assert declared <= documented, f"docs/configuration.md misses {sorted(declared - documented)}"
    stray = {n for n in documented - declared if not n.startswith(TEST_PREFIX)}
    assert not stray, f"docs/configuration.md names variables streamd does not read: {sorted(stray)}"


def test_configuration_table_gives_each_default_and_secret_flag() -> None:
    rows = _table_rows(_section(_read(CONFIGURATION), "## All variables"))
    for v in VARIABLES:
        assert v.name in rows, f"docs/configuration.md: no table row for `{v.name}`"
        default, _meaning, secret = rows[v.name]
        assert default == (f"`{v.default}`" if v.default else "(empty)"), (
            f"docs/configuration.md: default of {v.name} is {default}, config.py says {v.default!r}")
        assert secret == ("yes" if v.secret else "no"), (
            f"docs/configuration.md: {v.name} should be marked secret={'yes' if v.secret else 'no'}")
    assert set(rows) == {v.name for v in VARIABLES}


def test_configuration_test_variables_match_the_test_suite() -> None:
    documented = {n for n in VAR.findall(_read(CONFIGURATION)) if n.startswith(TEST_PREFIX) and n != TEST_PREFIX}
    used = set()
    for path in (REPO / "tests").rglob("*.py"):
        if path.name != Path(__file__).name:
            used |= {n for n in VAR.findall(_read(path)) if n.startswith(TEST_PREFIX) and n != TEST_PREFIX}
    assert documented == used, (
        f"test variables: documented only {sorted(documented - used)}, "
        f"used but undocumented {sorted(used - documented)}")


def test_no_doc_names_an_unknown_variable() -> None:
    declared = {v.name for v in VARIABLES}
    for path in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        stray = {n for n in VAR.findall(_read(path)) if n not in declared and not n.startswith(TEST_PREFIX)}
        assert not stray, f"{path.relative_to(REPO)} names variables streamd does not read: {sorted(stray)}"


# -- topologies.md ---------------------------------------------------------------------


def _builtin_types() -> dict[str, type]:
    return {name: cls for name, cls in registered().items() if cls.__module__.startswith("streamd.")}


def test_every_builtin_node_type_is_documented() -> None:
    text = _read(TOPOLOGIES)
    builtins = _builtin_types()
    assert builtins, "no built-in Node types registered"
    headings = set(re.findall(r"^### `([^`]+)`$", _section(text, "## Built-in Nodes"), flags=re.M))
    missing = sorted(set(builtins) - headings)
    assert not missing, f"docs/topologies.md has no section for Node type(s) {missing}"
    stale = sorted(headings - set(builtins))
    assert not stale, f"docs/topologies.md documents Node type(s) that are not registered: {stale}"
    overview = _table_rows(_section(text, "## Built-in Nodes"))
    assert set(builtins) <= set(overview), f"overview table misses {sorted(set(builtins) - set(overview))}"


def test_shipped_topology_stages_are_as_documented() -> None:
    """The `streamd validate` output quoted in docs/topologies.md is what it prints today."""
    text = _read(TOPOLOGIES)
    quoted = re.search(r"^(topologies/surface-inspection\.yaml: ok: .*)$", text, flags=re.M)
    assert quoted, "docs/topologies.md should quote `streamd validate topologies/surface-inspection.yaml`"
    out = _validate(["topologies/surface-inspection.yaml"], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == quoted[1]


def _param_tables() -> dict[str, dict[str, list[str]]]:
    """Per built-in Node type: its documented params (rows of the table under its heading)."""
    section = _section(_read(TOPOLOGIES), "## Built-in Nodes")
    out = {}
    for m in re.finditer(r"^### `([^`]+)`$", section, flags=re.M):
        out[m[1]] = _table_rows(_section(section, m[0]))
    return out


def _params_read(cls: type) -> set[str]:
    """The params a Node class reads: ``self.param("name", ...)`` and ``_pair(self, "name", ...)``."""
    source = inspect.getsource(cls)
    return set(re.findall(r"(?:self\.param|_pair)\((?:self, )?\"(\w+)\"", source))


def _literal(cell: str) -> Any:
    """The value of a default cell that is one code span (`128`, `[10.0, 60.0]`, `1/255`), else NO_LITERAL."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    if not m:
        return NO_LITERAL
    frac = re.fullmatch(r"(\d+)/(\d+)", m[1])
    return int(frac[1]) / int(frac[2]) if frac else yaml.safe_load(m[1])


NO_LITERAL = object()


def test_builtin_node_params_and_defaults_are_as_documented() -> None:
    tables = _param_tables()
    sinks = {name: SinkSpec(name, f"t.{name}") for name in ("results", "anomalies", "dead_letter")}
    env = NodeEnv(settings=Settings(), topology_name="docs", base_dir=REPO, sinks=sinks)
    required = {"onnx.model": {"model": "models/surface-ae/model.onnx"}}
    for name, cls in _builtin_types().items():
        documented = tables.get(name, {})
        assert set(documented) == _params_read(cls), (
            f"docs/topologies.md, {name}: documents params {sorted(documented)}, "
            f"the class reads {sorted(_params_read(cls))}")
        node = cls("n", required.get(name, {}), env)
        for param, cells in documented.items():
            value = _literal(cells[0])
            if value is NO_LITERAL or not hasattr(node, param):
                continue
            actual = getattr(node, param)
            actual = list(actual) if isinstance(actual, tuple) else actual
            assert actual == pytest.approx(value), f"docs/topologies.md, {name}: default of {param} is {actual!r}"


@pytest.fixture
def glare_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example package of docs/topologies.md, written to disk and importable as ``my_plant``."""
    text = _read(TOPOLOGIES)
    sources = [b for b in _code_blocks(text, "python") if "class GlareFilter(Node)" in b]
    assert len(sources) == 1, "docs/topologies.md should hold one python block with the GlareFilter example"
    topologies = [b for b in _code_blocks(text, "yaml") if "my_plant.nodes:GlareFilter" in b]
    assert len(topologies) == 1, "docs/topologies.md should hold one yaml block using my_plant.nodes:GlareFilter"
    pkg = tmp_path / "my_plant"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nodes.py").write_text(sources[0])
    (tmp_path / "glare-inspection.yaml").write_text(topologies[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield tmp_path
    finally:
        for name in ("my_plant.nodes", "my_plant"):
            sys.modules.pop(name, None)
        cls = base._REGISTRY.get("plant.glare_filter")
        if cls is not None and cls.__module__ == "my_plant.nodes":
            del base._REGISTRY["plant.glare_filter"]


def test_example_node_loads_and_behaves_as_documented(glare_example: Path) -> None:
    data = yaml.safe_load(_read(glare_example / "glare-inspection.yaml"))
    topo = parse(data, file="glare-inspection.yaml", base_dir=REPO, settings=Settings())
    assert topo.nodes["glare"].type == "my_plant.nodes:GlareFilter"
    nodes = topo.build_nodes(topo.node_env(Settings()))
    glare = nodes["glare"]
    assert type(glare).__name__ == "GlareFilter"
    assert glare.type_name == "plant.glare_filter"  # @register ran on import
    glare.setup()

    run = RunContext(topology=topo.name, run_id="r1", origin=Origin("cameras.frames", 0, 7), kind="frame",
                     source="line3-cam07")
    rng = np.random.default_rng(0)
    clean = {"tensor": rng.uniform(0.2, 0.7, (1, 128, 128)).astype(np.float32), "orig_size": [480, 640]}
    assert glare.process(run, {"preprocess": clean}) is clean
    assert glare.process_batch([run, run], [{"preprocess": clean}] * 2) == [clean, clean]

    glaring = {"tensor": clean["tensor"].copy(), "orig_size": [480, 640]}
    glaring["tensor"][:, :32, :] = 1.0  # a quarter of the frame saturated
    with pytest.raises(BadInput, match="glare") as exc:
        glare.process(run, {"preprocess": glaring})
    assert exc.value.reason == "bad_input" and exc.value.node == "glare"


def test_example_node_rejects_bad_params_as_documented(glare_example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _read(TOPOLOGIES)
    quoted = re.search(r"^streamd: error: (bad\.yaml: at nodes\.glare\..*)$", text, flags=re.M)
    assert quoted, "docs/topologies.md should quote the error for bad.yaml"
    good = _read(glare_example / "glare-inspection.yaml")
    assert "max_fraction: 0.02" in good
    (glare_example / "bad.yaml").write_text(good.replace("max_fraction: 0.02", "max_fraction: 2"))
    monkeypatch.chdir(glare_example)
    with pytest.raises(TopologyError) as exc:
        load("bad.yaml", settings=Settings(models_dir=str(REPO)))
    assert str(exc.value) == quoted[1]


def test_example_topology_validates_on_the_command_line(glare_example: Path) -> None:
    text = _read(TOPOLOGIES)
    quoted = re.search(r"^(glare-inspection\.yaml: ok: .*)$", text, flags=re.M)
    assert quoted, "docs/topologies.md should quote `streamd validate glare-inspection.yaml`"
    out = _validate(["glare-inspection.yaml"], cwd=glare_example,
                    env={"PYTHONPATH": str(glare_example), "STREAMD_MODELS_DIR": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == quoted[1]


def _validate(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_") and k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "streamd", "validate", *args], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120)


# -- reliability.md --------------------------------------------------------------------


def test_every_dead_letter_reason_is_explained() -> None:
    rows = _table_rows(_section(_read(RELIABILITY), "## Dead letters"))
    missing = sorted(set(tp.REASONS) - set(rows))
    assert not missing, f"docs/reliability.md: no row for dead-letter reason(s) {missing}"
    stale = sorted(set(rows) - set(tp.REASONS))
    assert not stale, f"docs/reliability.md explains reason(s) that streamd.tp.REASONS lacks: {stale}"
    for reason, cells in rows.items():
        assert len(cells) == 3 and all(cells), f"docs/reliability.md: row of {reason} needs stage, meaning, action"


# -- links -------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = _slug(m[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(doc: Path) -> None:
    broken = []
    for target in LINK.findall(_without_code(_read(doc))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def test_link_checker_sees_links() -> None:
    links = LINK.findall(_without_code(_read(REPO / "README.md")))
    assert "docs/configuration.md" in links and "docs/reliability.md" in links
    assert _slug("Brokers: RabbitMQ `consumer_timeout` and Redis `visibility_timeout`") == (
        "brokers-rabbitmq-consumer_timeout-and-redis-visibility_timeout")
    assert _slug("6. event_id") == "6-event_id"
