"""The execution plan of a topology: Nodes grouped into stages.

A *stage* is what one Celery task runs: a chain of Nodes on the same queue
where each Node but the last has exactly one child, the next (operator
chaining, as Flink does). Fusion is on by default; ``fusion: false`` on the
topology or ``fuse: false`` on a Node turns it off, and then every Node is its
own stage. Outputs cross Redis only between stages.

A Node of the chain may have parents outside it (a *join fused into the
chain*): ``combine`` with parents ``ae_score`` and ``quality`` joins the stage
of the parent that is deepest in the DAG (``ae_score``, behind the model), and
the stage then waits for every stage that holds one of its outside parents.
A stage with several parent stages is a *join*: it runs once, after all of
them have stored their outputs (see :mod:`streamd.runs`).
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
    input_nodes: tuple[str, ...]  # Nodes outside the stage whose outputs it reads (empty for a root stage)
    has_sink: bool
    node_parents: tuple[tuple[str, ...], ...]  # each Node's parents, in the topology's order

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
    depth: dict[str, int] = {}
    for n in topo.order:
        spec = topo.nodes[n]
        depth[n] = 1 + max((depth[p] for p in spec.parents), default=-1)
        host = _host(topo, n, stage_of, chains, depth) if fuse_all and spec.fuse else None
        if host is not None:
            chains[stage_of[host]].append(n)
            stage_of[n] = stage_of[host]
        else:
            stage_of[n] = n
            chains[n] = [n]
    stages = {}
    for sid, chain in chains.items():
        outside = tuple(dict.fromkeys(p for n in chain for p in topo.nodes[n].parents if stage_of[p] != sid))
        stages[sid] = Stage(
            id=sid,
            nodes=tuple(chain),
            queue=topo.nodes[chain[0]].queue,
            parents=tuple(dict.fromkeys(stage_of[p] for p in outside)),
            children=tuple(dict.fromkeys(stage_of[c] for c in topo.children(chain[-1]))),
            input_nodes=outside,
            has_sink=any(n in sink_nodes for n in chain),
            node_parents=tuple(tuple(topo.nodes[n].parents) for n in chain),
        )
    order = tuple(s for s in dict.fromkeys(stage_of[n] for n in topo.order))
    return Plan(
        topology=topo.name,
        stages=stages,
        order=order,
        sink_stages=tuple(s for s in order if stages[s].has_sink),
    )


def _host(topo: Topology, n: str, stage_of: dict[str, str], chains: dict[str, list[str]],
          depth: dict[str, int]) -> str | None:
    """The parent whose chain ``n`` extends, or None: ``n`` starts a stage of its own.

    A parent qualifies when ``n`` is its only child, it ends its chain, it runs
    on ``n``'s queue and it may fuse. Of several, the deepest in the DAG wins
    (the one most likely to finish last), so the other parents' stages are
    done, or nearly, when the chain gets to ``n``.
    """
    spec = topo.nodes[n]
    fits = [p for p in spec.parents
            if topo.children(p) == [n] and chains[stage_of[p]][-1] == p
            and topo.nodes[p].queue == spec.queue and topo.nodes[p].fuse]
    return max(fits, key=lambda p: depth[p]) if fits else None
