"""Optional speed-ups of streaming on CPU: channels-last memory format and torch.compile.

``python -m suites.speed [--quick]`` times one forward + backward of the paper's Figs 2-3 network
(see ``measure.paper_network``) for each configuration of ``CONFIGS`` in a fresh process, checks
that streaming stays exact under channels-last (float64), and writes ``results.jsonl`` and
``SUMMARY.md`` (built from the results file alone) to ``reports/speed/``.
"""
