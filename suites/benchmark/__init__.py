"""Benchmark suite: memory and time of streaming vs conventional training (paper Figs 2-3).

``python -m suites.benchmark --help``. Suites are declared as data in ``grid.py``; every point is
measured in a fresh process by ``point.py``; rows land in ``results.jsonl``; ``plots.py`` and
``summary.py`` read only that file.
"""
