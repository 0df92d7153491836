"""The execution plan of a topology: Nodes grouped into stages.

A *stage* is what one Celery task runs: Nodes of one queue, run one after the
other in the topology's order on the same batch. Outputs cross Redis only
between stages. Fusion is on by default; ``fusion: false`` on the topology or
``fuse: false`` on a Node turns it off, and then every Node (or that Node) is
its own stage. A Node joins the stage of a parent on its queue in one of two
ways:

* *chain* (operator chaining, as Flink does): the parent is the last Node of
  its stage and this Node its only child. A Node with several parents (a
  *join*) extends the chain of the parent that is deepest in the DAG
  (``combine`` with parents ``ae_score`` and ``quality`` joins ``ae_score``'s
  stage, behind the model); the stage then also waits for every stage that
  holds one of its outside parents. A join is never fused where it would make
  two stages wait for each other.
* *fan-out*: every parent of the Node is in that stage already
  (``quality`` after ``preprocess``, beside the branch that leaves for the
  model's queue). It saves a task and a read of the parent's output, at the
  price of running after its siblings in the stage rather than beside them.

A stage stores the outputs of its *exports* (its Nodes that have a child in
another stage), one Redis value per Node and batch. A stage with several
parent stages is a *join*: it runs once, after all of them have stored their
outputs (see :mod:`streamd.runs`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .topology import Topology

__all__ = ["Stage", "Plan", "plan", "in_process"]


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
    exports: tuple[str, ...]  # the stage's Nodes whose outputs a later stage reads (stored in Redis)

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def is_root(self) -> bool:
        return not self.input_nodes


@dataclass(frozen=True)
class Plan:
    topology: str
    stages: dict[str, Stage]
    order: tuple[str, ...]
    sink_stages: tuple[str, ...]
    fusion: bool = True  # whether the plan fused Nodes (topology's ``fusion``, or the override)

    @property
    def exports(self) -> tuple[str, ...]:
        """Every Node whose outputs cross Redis, in stage order."""
        return tuple(n for s in self.order for n in self.stages[s].exports)

    def roots(self) -> list[Stage]:
        return [self.stages[s] for s in self.order if self.stages[s].is_root]


def plan(topo: Topology, sink_nodes: set[str], *, fusion: bool | None = None) -> Plan:
    """Group the topology's Nodes into stages. ``sink_nodes`` are the ids of Nodes whose class is a sink."""
    fuse_all = topo.fusion if fusion is None else fusion
    stage_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    depth: dict[str, int] = {}
    for n in topo.order:
        spec = topo.nodes[n]
        depth[n] = 1 + max((depth[p] for p in spec.parents), default=-1)
        host = _host(topo, n, stage_of, members, depth) if fuse_all and spec.fuse else None
        if host is not None:
            members[stage_of[host]].append(n)
            stage_of[n] = stage_of[host]
        else:
            stage_of[n] = n
            members[n] = [n]
    stages = {}
    for sid, nodes in members.items():
        outside = tuple(dict.fromkeys(p for n in nodes for p in topo.nodes[n].parents if stage_of[p] != sid))
        stages[sid] = Stage(
            id=sid,
            nodes=tuple(nodes),
            queue=topo.nodes[nodes[0]].queue,
            parents=tuple(dict.fromkeys(stage_of[p] for p in outside)),
            children=tuple(dict.fromkeys(stage_of[c] for n in nodes for c in topo.children(n)
                                         if stage_of[c] != sid)),
            input_nodes=outside,
            has_sink=any(n in sink_nodes for n in nodes),
            node_parents=tuple(tuple(topo.nodes[n].parents) for n in nodes),
            exports=tuple(n for n in nodes if any(stage_of[c] != sid for c in topo.children(n))),
        )
    order = tuple(s for s in dict.fromkeys(stage_of[n] for n in topo.order))
    return Plan(
        topology=topo.name,
        stages=stages,
        order=order,
        sink_stages=tuple(s for s in order if stages[s].has_sink),
        fusion=fuse_all,
    )


def _host(topo: Topology, n: str, stage_of: dict[str, str], members: dict[str, list[str]],
          depth: dict[str, int]) -> str | None:
    """The parent whose stage ``n`` joins, or None: ``n`` starts a stage of its own.

    A parent qualifies when it runs on ``n``'s queue and may fuse. Chain first:
    a parent that ends its stage and has ``n`` as its only child; of several,
    the deepest in the DAG (the one most likely to finish last, so the other
    parents' stages are done, or nearly, when the stage gets to ``n``), unless
    the stage would then wait for a stage that waits for it. Then fan-out:
    every parent of ``n`` is in one qualifying stage.
    """
    spec = topo.nodes[n]
    fits = [p for p in spec.parents if topo.nodes[p].queue == spec.queue and topo.nodes[p].fuse]
    chain = [p for p in fits if topo.children(p) == [n] and members[stage_of[p]][-1] == p]
    for p in sorted(chain, key=lambda p: -depth[p]):
        outside = {stage_of[q] for q in spec.parents if stage_of[q] != stage_of[p]}
        if not outside & _downstream(topo, stage_of[p], stage_of, members):
            return p
    if fits and len(fits) == len(spec.parents) and len({stage_of[p] for p in fits}) == 1:
        return fits[0]
    return None


def _downstream(topo: Topology, stage: str, stage_of: dict[str, str], members: dict[str, list[str]]) -> set[str]:
    """The stages placed so far that wait, directly or not, for ``stage``."""
    seen: set[str] = set()
    todo = [stage]
    while todo:
        s = todo.pop()
        for c in (c for m in members[s] for c in topo.children(m) if c in stage_of):
            if stage_of[c] != s and stage_of[c] not in seen:
                seen.add(stage_of[c])
                todo.append(stage_of[c])
    return seen


def in_process(plan: Plan, topo: Topology, queues: Collection[str]) -> frozenset[str]:
    """The stages a worker serving ``queues`` runs itself, right after their parent stage, in the same task.

    A stage qualifies when its only parent stage and itself are on the worker's queues (the task's
    outputs are already in the process: sending them through Redis and the broker to this same
    worker would only add a hop) and fusion allows it (the plan fused, and the stage's first Node may
    fuse). A join waits for other stages, so it is always dispatched."""
    if not plan.fusion:
        return frozenset()
    return frozenset(s.id for s in plan.stages.values()
                     if len(s.parents) == 1 and s.queue in queues and plan.stages[s.parents[0]].queue in queues
                     and topo.nodes[s.head].fuse)
