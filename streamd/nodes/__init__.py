"""Nodes: the steps of a topology's DAG (see :mod:`streamd.nodes.base` for the API)."""

from .base import SOURCE, Node, NodeEnv, Origin, RunContext, register, registered, resolve

__all__ = ["SOURCE", "Node", "NodeEnv", "Origin", "RunContext", "register", "registered", "resolve"]
