"""Tests of the built-in Nodes (streamd.nodes)."""
