"""Whole-slide evidence: ``python -m suites.slides [--quick] [--out DIR] [--workdir DIR] [--redo]``.

Rules (slides suite):

V1. The points are data (``grid``): peak RSS against file size (slides up to >= 4 GB, streamed from
    the file), time per megapixel from the file against from a uint8 tensor in memory (one size
    that fits), and background skipping at 10/25/50/75 % tissue (masked against unmasked, same
    slide, interleaved in one process so that both sides see the same machine load, on one
    intra-op thread so that process CPU time measures the work: with several threads, waiting
    threads spin and CPU time grows with the load of the shared machine). Each point runs in a
    fresh process (``point.py``).
V2. Slides are generated in the run, in ``--workdir`` (a temporary folder by default), after a
    free-space check, and deleted when their points are done; none is ever committed.
V3. Rows (``suites/rows.py``) are appended to ``results.jsonl`` as each point finishes, keyed by
    their settings; a rerun
    skips finished points, so an interrupted run loses nothing; ``--redo`` measures the selected
    points again, and their new rows supersede the old (``suites/rows.py`` Rule J2).
    Every row carries ``suites.environment.environment("cpu")`` and the command that made it.
V4. ``SUMMARY.md`` and ``slides.png`` are written from the rows alone (``summary.py``).
V5. Decoding: a JPEG slide (256 px tiles, quality 90, as scanners write) streamed from its file
    against its decoded pixels in a uint8 tensor, interleaved in one process, per setting of
    ``decode_threads`` and ``cache_bytes`` (torch's default threads: wall-clock is what a user
    waits for, and the decoding threads compete with torch's for the same cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from suites import fresh
from suites.environment import environment
from suites.rows import append_row
from suites.slides.generate import write_slide
from suites.slides.summary import ROW_KEYS, load, write_summary

REPO = Path(__file__).resolve().parents[2]
MEASURED = ("kind", "tile", "reps", "mode", "threads", "decode_threads", "cache_mib")  # to point.py


@dataclass(frozen=True)
class Point:
    experiment: str  # "rss", "disk_vs_memory", "skipping"
    kind: str  # "disk", "memory"; interleaved pairs: "file_memory", "paired" (unmasked/masked)
    side: int  # slide edge, px
    fraction: float  # tissue in the generated slide
    tile: int
    reps: int
    mode: str  # "train" (forward + backward) or "infer" (forward only)
    threads: int = 0  # torch intra-op threads; 0: torch's default
    compression: str = "none"  # the slide's tiles: "none" or "jpeg" (quality 90)
    decode_threads: int = 1  # open_image(decode_threads=...): a region's tiles decoded in parallel
    cache_mib: int = 0  # open_image(cache_bytes=...): decoded tiles kept for backward's reads

    @property
    def key(self) -> str:
        key = f"{self.experiment}/{self.mode}/{self.kind}/{self.side}/{self.fraction}/{self.tile}"
        key += f"/threads{self.threads}" if self.threads else ""
        if self.compression != "none":
            key += f"/{self.compression}/decode{self.decode_threads}/cache{self.cache_mib}"
        return key


def grid(*, quick: bool) -> list[Point]:
    """Rule V1. Full: slides of 0.2, 1.1 and 4.5 GB streamed forward (inference; a training step
    on the 4.4 GB slide takes over 20 min on the shared 2 cores), and training steps on 4096² px
    (50 MB) for the comparisons; quick: tiny slides, one tissue fraction."""
    if quick:
        sides, side, tile, small_tile, reps, fractions = (1024, 2048), 1024, 256, 128, 1, (0.5,)
        pairs = 2
    else:
        sides, side, tile, small_tile, reps = (8192, 19456, 38912), 4096, 2048, 512, 3
        fractions, pairs = (0.1, 0.25, 0.5, 0.75), 6
    points = [Point("rss", "disk", s, 0.5, tile, 1, "infer") for s in sides]
    points += [
        Point("disk_vs_memory", k, side, 0.5, tile, reps, "train") for k in ("disk", "memory")
    ]
    points.append(Point("disk_vs_memory", "file_memory", side, 0.5, small_tile, pairs, "train", 1))
    for fraction in fractions:
        points.append(Point("skipping", "paired", side, fraction, small_tile, pairs, "train", 1))
    # Rule V5: a JPEG slide from its file against its decoded pixels in memory, per setting
    jpeg_side, jpeg_tile = (1024, 256) if quick else (8192, 1024)
    settings = ((2, 64),) if quick else ((1, 0), (2, 0), (1, 256), (2, 256))
    for decode_threads, cache_mib in settings:
        points.append(
            Point(
                "decoding", "file_memory", jpeg_side, 0.5, jpeg_tile, min(pairs, 4), "train",
                compression="jpeg", decode_threads=decode_threads, cache_mib=cache_mib,
            )
        )  # fmt: skip
    return points


def finished(results: Path) -> set[str]:
    return {row["key"] for row in load(results)}


def run_point(point: Point, path: Path) -> dict[str, Any]:
    """One fresh process (Rule V1, ``suites/fresh.py``)."""
    payload = {"path": str(path), **{k: getattr(point, k) for k in MEASURED}}
    done = fresh.run("suites.slides.point", payload)
    if done.returncode != 0 or done.result is None:
        raise RuntimeError(f"point {point.key} failed:\n{done.stderr[-3000:]}")
    return done.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m suites.slides", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny slides (a test runs this)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "slides")
    parser.add_argument("--workdir", type=Path, default=None, help="where slides are generated")
    parser.add_argument(
        "--redo", action="store_true", help="measure the selected points again (new rows win)"
    )
    parser.add_argument(
        "--only",
        choices=("rss", "disk_vs_memory", "skipping", "decoding"),
        action="append",
        help="run only these experiments (repeatable); rows from several runs merge by key",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = set() if args.redo else finished(results)  # Rule V3: new rows supersede old ones
    points = [
        p
        for p in grid(quick=args.quick)
        if p.key not in done and (not args.only or p.experiment in args.only)
    ]
    command = "python -m suites.slides" + (" --quick" if args.quick else "")
    command += "".join(f" --only {e}" for e in args.only or ())
    workdir = Path(tempfile.mkdtemp(prefix="streamcheck-slides-", dir=args.workdir))
    try:
        slides = sorted({(p.side, p.fraction, p.compression) for p in points})
        for number, (side, fraction, compression) in enumerate(slides, 1):
            need = side * side * 3 * 1.1
            free = shutil.disk_usage(workdir).free
            if free < 2 * need:  # Rule V2
                raise SystemExit(
                    f"slides: {side}² px needs {need / 1e9:.1f} GB; {workdir} has {free / 1e9:.1f} GB free"
                )
            start = time.perf_counter()
            slide = write_slide(
                workdir / f"slide-{side}-{fraction}-{compression}.tif",
                side=side,
                fraction=fraction,
                compression=compression,
            )
            print(
                f"[{number}/{len(slides)}] wrote {side}² px, {slide.file_bytes / 1e9:.2f} GB, "
                f"tissue {slide.tissue_fraction:.2f} in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            here = (side, fraction, compression)
            for point in [p for p in points if (p.side, p.fraction, p.compression) == here]:
                start = time.perf_counter()
                metrics = run_point(point, slide.path)
                row = {
                    "key": point.key,
                    "status": "ok",
                    "params": {
                        **asdict(point),
                        "file_bytes": slide.file_bytes,
                        "tissue_fraction": slide.tissue_fraction,
                    },
                    "metrics": metrics,
                    "environment": environment("cpu"),
                    "run": {
                        "command": command,
                        "nice": metrics["nice"],
                        "quick": args.quick,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    },
                }
                append_row(results, row, required=ROW_KEYS)
                took = f"({time.perf_counter() - start:.0f} s)"
                if point.kind in ("paired", "file_memory"):
                    done_text = f"speed-up {metrics['speedup_wall']:.2f}x wall, {metrics['speedup_cpu']:.2f}x CPU"
                else:
                    done_text = f"{metrics['median_step_s']:.1f} s/step, peak RSS {metrics['peak_rss_bytes'] / 2**20:.0f} MiB"
                print(f"    {point.key}: {done_text} {took}", flush=True)
            slide.path.unlink()  # Rule V2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_summary(results, args.out)
    print(f"wrote {args.out / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
