"""Imports the built-in Node modules so that their types are registered."""

from __future__ import annotations

import contextlib

from . import image, onnx, scoring, sink  # noqa: F401

with contextlib.suppress(ImportError):  # sensor Nodes land separately
    from . import sensor  # noqa: F401
