"""What a Node is, and the registry that maps type names to Node classes.

A Node is one step of a topology's DAG. It is built once per worker process
from its YAML ``params`` and then called for every run (one input message)
with the outputs of its parents. Plants add their own Node classes without
forking streamd: a topology names them by import string
(``"my_plant.nodes:GlareFilter"``) or a package registers them with
:func:`register`.

Contract for a Node class:

* ``__init__(node_id, params, env)`` checks ``params`` and raises
  :class:`~streamd.exceptions.TopologyError` (with the YAML path) for a bad
  one. It must be cheap: no model loading here, :meth:`Node.setup` does that.
* ``setup()`` runs once per process before the first input (load the model,
  warm up, open the producer). Prefork workers call it *after* the fork.
* ``process(run, inputs)`` takes ``inputs``: a mapping from parent node id to
  that parent's output (a root Node gets the decoded TP message under
  :data:`SOURCE`) and returns this Node's output: numpy arrays, numbers,
  strings, bytes, lists and dicts of those. Raise
  :class:`~streamd.exceptions.BadInput` for input that can never succeed
  (dead-lettered at once); any other exception is retried, then dead-lettered.
* ``process_batch(runs, inputs)`` may be overridden to run several inputs at
  once (micro-batching); it must give the same outputs as ``process``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..exceptions import TopologyError

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["SOURCE", "Origin", "RunContext", "NodeEnv", "Node", "register", "resolve", "registered"]

#: Key under which a root Node receives the decoded TP input message.
SOURCE = "$source"


@dataclass(frozen=True)
class Origin:
    """Where an input message came from."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class RunContext:
    """One run of the DAG: everything about the input except its payload."""

    topology: str
    run_id: str
    origin: Origin
    kind: str
    source: str | None = None
    seq: int | None = None
    ts: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "run_id": self.run_id,
            "origin": self.origin.as_dict(),
            "kind": self.kind,
            "source": self.source,
            "seq": self.seq,
            "ts": self.ts,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunContext:
        o = d["origin"]
        return cls(
            topology=d["topology"],
            run_id=d["run_id"],
            origin=Origin(o["topic"], int(o["partition"]), int(o["offset"])),
            kind=d["kind"],
            source=d.get("source"),
            seq=d.get("seq"),
            ts=d.get("ts"),
            meta=d.get("meta") or {},
        )


@dataclass
class NodeEnv:
    """What a Node may use besides its params: settings, paths, the topology's sinks."""

    settings: Settings
    topology_name: str
    base_dir: Path
    sinks: Mapping[str, Any] = field(default_factory=dict)
    metrics: Any = None
    publisher: Any = None

    def resolve_path(self, value: str) -> Path:
        """A model or data path: absolute, or relative to STREAMD_MODELS_DIR, the topology's folder or ./ ."""
        p = Path(value)
        if p.is_absolute():
            return p
        candidates = []
        if self.settings.models_dir:
            candidates.append(Path(self.settings.models_dir) / p)
        candidates += [self.base_dir / p, self.base_dir.parent / p, Path.cwd() / p]
        for c in candidates:
            if c.exists():
                return c
        return candidates[0]


class Node:
    """Base class for Nodes. Subclasses set ``type_name`` and override :meth:`process`."""

    type_name: ClassVar[str] = ""
    #: A sink publishes the run's outcome; every Node must reach one.
    is_sink: ClassVar[bool] = False

    def __init__(self, node_id: str, params: Mapping[str, Any], env: NodeEnv) -> None:
        self.node_id = node_id
        self.params = dict(params)
        self.env = env

    # -- helpers for params checking -------------------------------------------------
    def param(self, name: str, default: Any = ..., *, kind: type | tuple[type, ...] | None = None) -> Any:
        """Read one param; a missing required one or a wrong type raises TopologyError with its YAML path."""
        path = f"nodes.{self.node_id}.params.{name}"
        if name not in self.params:
            if default is ...:
                raise TopologyError(f"node {self.node_id!r} ({self.type_name}) needs param {name!r}", path=path)
            return default
        value = self.params[name]
        numeric = kind in (int, float, (int, float))
        if kind is not None and not isinstance(value, kind) or isinstance(value, bool) and numeric:
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)  # type: ignore[union-attr]
            raise TopologyError(f"param {name!r} must be {want}, got {value!r}", path=path)
        return value

    # -- lifecycle ---------------------------------------------------------------------
    def setup(self) -> None:
        """Once per process, before the first input (after a prefork fork)."""

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def process_batch(self, runs: Sequence[RunContext], inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
        return [self.process(r, i) for r, i in zip(runs, inputs, strict=True)]

    def close(self) -> None:
        """When the process stops."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_id!r}>"


_REGISTRY: dict[str, type[Node]] = {}
N = TypeVar("N", bound=type[Node])


def register(type_name: str) -> Callable[[N], N]:
    """Class decorator: make a Node class available under ``type_name`` in topologies."""

    def deco(cls: N) -> N:
        if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
            raise ValueError(f"Node type {type_name!r} is already registered by {_REGISTRY[type_name]!r}")
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls

    return deco


def registered() -> dict[str, type[Node]]:
    _load_builtins()
    return dict(_REGISTRY)


_PLUGINS_LOADED = False


def _load_builtins() -> None:
    """Import the built-in Nodes, and once, the Node packages that declare the
    ``streamd.nodes`` entry point group (``[project.entry-points."streamd.nodes"]``)."""
    global _PLUGINS_LOADED
    importlib.import_module("streamd.nodes.builtins")
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="streamd.nodes"):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not hide the built-ins
            import logging

            logging.getLogger(__name__).error("cannot load Node package %s (%s): %s", ep.name, ep.value, exc)


def resolve(type_name: str, *, path: str = "") -> type[Node]:
    """The Node class for a registered name or an import string ``"package.module:Class"``."""
    _load_builtins()
    if type_name in _REGISTRY:
        return _REGISTRY[type_name]
    if ":" in type_name:
        mod_name, _, attr = type_name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise TopologyError(f"cannot import Node class {type_name!r}: {exc}", path=path) from None
        if not (isinstance(obj, type) and issubclass(obj, Node)):
            raise TopologyError(f"{type_name!r} is not a streamd Node class", path=path)
        return obj
    known = ", ".join(sorted(_REGISTRY))
    raise TopologyError(
        f"unknown Node type {type_name!r}; known types: {known}; or give an import string 'package.module:Class'",
        path=path,
    )
