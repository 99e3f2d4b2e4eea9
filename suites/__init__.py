"""Benchmark, training and report suites of streamcheck (run from the repository root)."""
