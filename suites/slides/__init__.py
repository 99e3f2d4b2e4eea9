"""Whole-slide streaming evidence: peak RSS against file size, time per megapixel from disk and from
memory, and the speed-up of background skipping (``python -m suites.slides``; docs/SLIDES.md)."""
