"""The reproducibility report: ``python -m suites.report`` (``nox -s report``).

Builds ``reports/REPORT.md`` and a self-contained ``reports/report.html`` from the result files the
suites write under ``reports/`` (equivalence record, benchmark rows and figures, ImageNette run),
never from numbers typed in; see NOTE [ Where the report's numbers come from ] in ``render.py``.
"""
