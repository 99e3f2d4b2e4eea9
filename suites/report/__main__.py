"""python -m suites.report [--reports reports] [--out reports]: REPORT.md and report.html.

Without --out, every suite's SUMMARY.md is rewritten first (``summaries.py``, render.py Rule
P5), and the README's headline after. Reads only the result files under --reports, through each
suite's summary module. Missing files are stated in the report, not hidden.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import render, summaries

REPO = Path(__file__).resolve().parents[2]


def build(reports: Path, out: Path, *, command: str = "python -m suites.report") -> list[Path]:
    """Write ``out/REPORT.md`` and ``out/report.html`` from the result files under ``reports``."""
    out.mkdir(parents=True, exist_ok=True)
    text = render.markdown_report(reports, out, command=command)
    md_path, html_path = out / "REPORT.md", out / "report.html"
    md_path.write_text(text)
    html_path.write_text(render.to_html(text, "streamcheck reproducibility report"))
    return [md_path, html_path]


README_START, README_END = "<!-- report headline: start -->", "<!-- report headline: end -->"


def update_readme(readme: Path, reports: Path) -> bool:
    """Replace the README's headline block with the report's headline (generated, never typed)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    block = "\n".join([README_START, *render.readme_headline(reports), README_END])
    readme.write_text(before + block + after)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.report", description=__doc__)
    p.add_argument(
        "--reports", type=Path, default=REPO / "reports", help="result files (default: reports/)"
    )
    p.add_argument("--out", type=Path, help="output folder (default: the --reports folder)")
    args = p.parse_args(argv)
    command = " ".join(["python -m suites.report", *(sys.argv[1:] if argv is None else argv)])
    for path in [] if args.out else summaries.write_all(args.reports):
        print(path)
    for path in build(args.reports, args.out or args.reports, command=command):
        print(path)
    if args.out is None and update_readme(REPO / "README.md", args.reports):
        print(REPO / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
