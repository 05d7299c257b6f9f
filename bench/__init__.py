"""Benchmarks of the node daemon (JSON on stdout); see docs/benchmarks.md."""
