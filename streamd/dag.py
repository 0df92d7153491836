"""The execution plan of a topology: Nodes grouped into stages.

A *stage* is what one Celery task runs: a chain of Nodes on the same queue
where each Node is the only child of the one before and has no other parent
(operator chaining, as Flink does). Fusion is on by default; ``fusion: false``
on the topology or ``fuse: false`` on a Node turns it off, and then every Node
is its own stage. Outputs cross Redis only between stages.

A stage whose first Node has several parents is a *join*: it runs once, after
all its parent stages have stored their outputs (see :mod:`streamd.runs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .topology import Topology

__all__ = ["Stage", "Plan", "plan"]


@dataclass(frozen=True)
class Stage:
    id: str
    nodes: tuple[str, ...]
    queue: str
    parents: tuple[str, ...]  # parent stage ids
    children: tuple[str, ...]  # child stage ids
    input_nodes: tuple[str, ...]  # parent Node ids of the first Node (empty for a root stage)
    has_sink: bool

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def tail(self) -> str:
        return self.nodes[-1]

    @property
    def is_root(self) -> bool:
        return not self.input_nodes


@dataclass(frozen=True)
class Plan:
    topology: str
    stages: dict[str, Stage]
    order: tuple[str, ...]
    sink_stages: tuple[str, ...]

    def roots(self) -> list[Stage]:
        return [self.stages[s] for s in self.order if self.stages[s].is_root]

    def stage_of(self, node_id: str) -> Stage:
        for s in self.stages.values():
            if node_id in s.nodes:
                return s
        raise KeyError(node_id)


def plan(topo: Topology, sink_nodes: set[str], *, fusion: bool | None = None) -> Plan:
    """Group the topology's Nodes into stages. ``sink_nodes`` are the ids of Nodes whose class is a sink."""
    fuse_all = topo.fusion if fusion is None else fusion
    stage_of: dict[str, str] = {}
    chains: dict[str, list[str]] = {}
    for n in topo.order:
        spec = topo.nodes[n]
        if fuse_all and spec.fuse and len(spec.parents) == 1:
            p = spec.parents[0]
            if len(topo.children(p)) == 1 and topo.nodes[p].queue == spec.queue and topo.nodes[p].fuse:
                sid = stage_of[p]
                if chains[sid][-1] == p:
                    chains[sid].append(n)
                    stage_of[n] = sid
                    continue
        stage_of[n] = n
        chains[n] = [n]
    stages = {}
    for sid, chain in chains.items():
        head = topo.nodes[chain[0]]
        parents = tuple(dict.fromkeys(stage_of[p] for p in head.parents))
        children = tuple(dict.fromkeys(stage_of[c] for c in topo.children(chain[-1])))
        stages[sid] = Stage(
            id=sid,
            nodes=tuple(chain),
            queue=head.queue,
            parents=parents,
            children=children,
            input_nodes=head.parents,
            has_sink=any(n in sink_nodes for n in chain),
        )
    order = tuple(s for s in dict.fromkeys(stage_of[n] for n in topo.order))
    return Plan(
        topology=topo.name,
        stages=stages,
        order=order,
        sink_stages=tuple(s for s in order if stages[s].has_sink),
    )
