"""The equivalence record: the evidence that streaming is exact, as one JSON file.

``python -m suites.equivalence [--quick] [--examples N] [--out reports/equivalence]`` draws
networks with the project's hypothesis strategies (1D, 2D and 3D; float64 and float32), runs the
equivalence checker on each, checks a few torchvision trunks, and writes ``record.json``. The report
(``python -m suites.report``) and ``summary.py`` (SUMMARY.md) read only that file.
"""
