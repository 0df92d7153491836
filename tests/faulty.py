"""Node classes that misbehave on request, for fault-injection tests (named by import string)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamd.nodes.base import Node, RunContext


class Tamper(Node):
    """Passes its parent's output through, unless the run's meta asks for a fault:
    ``explode`` raises RuntimeError (a Node bug), ``wrong_shape`` hands the model a 3-channel tensor."""

    def process(self, run: RunContext, inputs: Mapping[str, Any]) -> Any:
        (value,) = inputs.values()
        if run.meta.get("explode"):
            raise RuntimeError("injected fault: the Node crashed")
        if run.meta.get("unstorable"):
            return {**value, "why": {"a", "set"}}  # a Python set cannot cross stages
        if run.meta.get("wrong_shape"):
            return {**value, "tensor": np.repeat(value["tensor"], 3, axis=0)}
        return value
