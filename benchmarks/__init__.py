"""Benchmarks: speed and accuracy measurements, reported in docs/benchmarks.md (never timed tests)."""
