"""The benchmark suites, declared as data: a name, the figure it reproduces, a parameter grid per mode.

A *point* is one (case, input, tile) measurement, run in a fresh process by ``point.py``; the
cases (what is run, with which settings) are in ``workload.CASES``. A point's ``key`` names the
resolved settings (workload Rule KS1), not the suite or the case, so a point shared by two suites
or two case names is measured once and used by both.

Modes: ``full`` (the committed sweep), ``quick`` (a few minutes: 1024^2 and 2048^2 only), ``gate``
(the CI regression gate: the 2048^2 points of ``ceilings.toml``), ``tiny`` (tests: 128^2, tile 64).
A grid may be limited to one device kind (``cpu`` or ``cuda``): on a GPU the input sweep goes on
to 32768^2 and the paper's Table 2 network is measured.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from .workload import CASES, case

# Smallest tile the tile suite starts from (see ``smallest_legal_tile``): every tile costs a fixed
# Python/dispatch overhead, and the legal minimum (7 px at 2048^2: ~4 * 10^6 tiles) would take
# hours, so the sweep starts at the smallest tile giving at most MAX_TILES tiles (SUMMARY.md says
# which). 400 keeps the full sweep under ~40 min on 2 cores.
MAX_TILES = 400


@dataclass(frozen=True)
class Point:
    """One measurement of case ``name``. Run in a fresh process; ``key`` identifies it."""

    name: str  # one of workload.CASES
    input_px: int
    tile_px: int | None = None  # None for conventional
    suite: str = ""  # the suite that asked for it first (informational: not in the key)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # None: all cores
    warmup: int = 1
    repeats: int = 5
    max_timing_s: float = 150.0  # fewer repeats (>= 1) when one step is slow; see point.py
    grad_check_max_px: int = 2048  # conventional reference gradients only up to this input
    # float64 reference only up to this input: on CPU float64 convolutions take torch's im2col
    # path, whose column buffer for the 64-channel conv at 2048^2 is 64 * 9 * 2048^2 * 8 B = 19 GiB.
    grad_check_f64_max_px: int = 1024
    seed: int = 0
    loss: str = "sum"
    mem_budget_bytes: int | None = None  # None: a share of MemAvailable at run time (runner.py)
    grad_ref_dir: str | None = None  # cache of reference gradients (runner.py: <out>/gradref)

    @property
    def key(self) -> str:
        """Workload Rule KS1: the case's resolved settings, not its name."""
        return point_key(case(self.name).resolved().key, self.params())

    def params(self) -> dict[str, Any]:
        """The row's ``params``: every field but the name."""
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def point_key(settings: str, params: dict[str, Any]) -> str:
    """``settings|device|dtype|input|tile|loss``: what identifies a measurement (Rule KS1).

    >>> point_key("streamcheck/paper/plain", Point("streamcheck", 2048, 512).params())
    'streamcheck/paper/plain|cpu|float32|2048|512|sum'
    """
    tile = "-" if params["tile_px"] is None else str(params["tile_px"])
    fields = (params["device"], params["dtype"], str(params["input_px"]), tile, params["loss"])
    return "|".join([settings, *fields])


@dataclass(frozen=True)
class Grid:
    """A cartesian product of cases x inputs x tiles (tiles ignored for conventional cases)."""

    cases: Sequence[str]
    input_px: Sequence[int]
    tile_px: Sequence[int | str | None] = (None,)
    device: str | None = None  # "cpu" or "cuda": only on that kind of device; None: any


@dataclass(frozen=True)
class Suite:
    name: str
    figure: str
    description: str
    grids: dict[str, Sequence[Grid]] = field(default_factory=dict)


TILE_FULL: tuple[int | str, ...] = ("smallest", 128, 256, 512, 1024, 2048)
INPUT_CPU = (512, 1024, 2048, 4096, 8192, 16384)
INPUT_CUDA = (*INPUT_CPU, 32768)
# Best against best: conventional with streamcheck's speed settings (and compiled) on the sizes
# conventional training fits in on a 2-core CPU machine.
INPUT_CONVENTIONAL_TUNED = (512, 1024, 2048, 4096)

with Path(__file__).with_name("ceilings.toml").open("rb") as _f:
    GATE = tomllib.load(_f)["gate"]

SPEED_CASES = [
    name for name, c in CASES.items() if c.network == "paper" and c.kind != "lightstream"
]
RESNET18_CASES = [name for name, c in CASES.items() if c.network == "resnet18"]

SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite(
            name="tile",
            figure="Fig 2",
            description="input 2048^2, memory and time vs tile size (up to the whole image)",
            grids={
                "full": [
                    Grid(["conventional"], [2048]),
                    Grid(["streamcheck"], [2048], TILE_FULL),
                ],
                "quick": [
                    Grid(["conventional"], [2048]),
                    Grid(["streamcheck"], [2048], [256, 512]),
                ],
                "tiny": [Grid(["conventional"], [128]), Grid(["streamcheck"], [128], [64])],
            },
        ),
        Suite(
            name="input",
            figure="Fig 3",
            description="tile 512, memory and time vs input size; conventional OOM -> estimated",
            grids={
                "full": [
                    # Past the paper's sizes conventional is predicted out of memory
                    # (analysis.predicted_oom) and recorded so, not run.
                    Grid(
                        [
                            "conventional",
                            "streamcheck",
                            "streamcheck_defaults",
                            "streamcheck_tuned",
                        ],
                        INPUT_CPU,
                        [512],
                        "cpu",
                    ),
                    Grid(
                        ["conventional", "streamcheck", "streamcheck_tuned"],
                        INPUT_CUDA,
                        [512],
                        "cuda",
                    ),
                    Grid(
                        ["conventional_tuned", "conventional_compiled"],
                        INPUT_CONVENTIONAL_TUNED,
                        [None],
                        "cpu",
                    ),
                    Grid(
                        [
                            "streamcheck_compiled",
                            "conventional_kept_compiled",
                            "streamcheck_defaults_compiled",
                            "conventional_huge_pages_compiled",
                        ],
                        [2048],
                        [512],
                        "cpu",
                    ),
                    Grid(
                        ["conventional_tuned", "conventional_compiled"], INPUT_CUDA, [None], "cuda"
                    ),
                ],
                "quick": [
                    Grid(["conventional", "streamcheck"], [1024, 2048], [512]),
                    Grid(["streamcheck_defaults"], [2048], [512]),
                    Grid(["conventional_tuned", "streamcheck_tuned"], [2048], [512]),
                    Grid(["conventional_compiled", "streamcheck_compiled"], [2048], [512]),
                ],
                "tiny": [
                    Grid(["conventional", "streamcheck"], [128], [64]),
                    Grid(
                        ["conventional_tuned", "conventional_compiled", "streamcheck_tuned"],
                        [128],
                        [64],
                    ),
                ],
            },
        ),
        Suite(
            name="peer",
            figure="Fig 3 (peer row)",
            description="the same workload with lightstream (skipped when not installed)",
            grids={
                "full": [Grid(["lightstream"], [512, 1024, 2048], [512])],
                "quick": [Grid(["lightstream"], [2048], [512])],
                "tiny": [Grid(["lightstream"], [128], [64])],
            },
        ),
        Suite(
            name="speed",
            figure="speed settings",
            description="input 2048^2, tile 512: each CPU speed setting alone and together",
            grids={
                "full": [Grid(SPEED_CASES, [2048], [512], "cpu")],
                "quick": [Grid(SPEED_CASES, [1024], [512], "cpu")],
                "tiny": [Grid(SPEED_CASES, [128], [64])],
            },
        ),
        Suite(
            name="resnet18",
            figure="second network",
            description="a ResNet-18 trunk (BatchNorm frozen), 2048^2, tile 1536: the speed "
            "settings off the benchmark network",
            grids={
                "full": [Grid(RESNET18_CASES, [2048], [1536], "cpu")],
                "quick": [Grid(RESNET18_CASES, [1024], [768], "cpu")],
            },
        ),
        Suite(
            name="table2",
            figure="Table 2 network",
            description="the paper's TUPAC16 network (streamed until the final seven layers), GPU",
            grids={
                "full": [
                    Grid(["table2_conventional"], [8192, 16384, 32768], [None], "cuda"),
                    Grid(
                        ["table2_streamcheck", "table2_streamcheck_tuned"],
                        [8192, 16384, 32768],
                        [2048],
                        "cuda",
                    ),
                ],
                "tiny": [Grid(["table2_conventional", "table2_streamcheck"], [256], [192])],
            },
        ),
        Suite(
            name="gate",
            figure="CI gate",
            description="conventional vs streamcheck at the size and tile of ceilings.toml",
            grids={
                "gate": [Grid(GATE["cases"], [GATE["input_px"]], [GATE["tile_px"]])],
                "tiny": [Grid(GATE["cases"], [128], [64])],
            },
        ),
    ]
}

# The suites a plain run of each mode measures.
DEFAULT_SUITES = {
    "full": ("tile", "input", "peer", "speed", "resnet18", "table2"),
    "quick": ("tile", "input", "peer"),
    "gate": ("gate",),
    "tiny": ("tile", "input", "peer"),
}

# Timing per mode: (warm-up runs, timed runs, seconds above which fewer timed runs are made).
TIMING = {"full": (1, 5, 90.0), "quick": (1, 3, 60.0), "gate": (1, 3, 60.0), "tiny": (1, 3, 10.0)}

# At each size: conventional first (its rows give the OOM trend), then each streaming case right
# after its conventional counterpart, so that a pair is measured back to back.
ORDER = (
    "conventional",
    "streamcheck",
    "streamcheck_defaults",
    "conventional_tuned",
    "streamcheck_tuned",
    "conventional_compiled",
    "streamcheck_compiled",
    "conventional_kept_compiled",
    "streamcheck_defaults_compiled",
    "conventional_huge_pages_compiled",
    "lightstream",
)


@functools.cache
def smallest_legal_tile(input_px: int, *, max_tiles: int | None = None) -> tuple[int, int]:
    """(smallest legal tile, smallest with at most ``max_tiles`` tiles) for the paper network.

    Legality and the owned output-tile edge do not depend on the image size, so each candidate is
    planned on a small image and the tile count extrapolated; the answer is checked on the real one.
    """
    import math

    import streamcheck

    from .workload import paper_network

    network = paper_network()
    legal = None
    for tile in range(1, input_px + 1):
        small = min(input_px, 4 * tile)
        try:
            plan = streamcheck.plan(network, (1, 3, small, small), tile=tile)
        except streamcheck.StreamcheckError:
            continue
        if legal is None:
            legal = tile
        n_tiles = math.ceil(input_px / plan.output_tile_px[0]) ** 2
        if max_tiles is None:
            return legal, tile
        if n_tiles <= max_tiles:
            real = streamcheck.plan(network, (1, 3, input_px, input_px), tile=tile)
            assert real.n_tiles <= max_tiles, "this is a streamcheck benchmark bug"
            return legal, tile
    raise AssertionError("no legal tile: this is a streamcheck benchmark bug")


def _tiles(values: Iterable[int | str | None], input_px: int) -> list[int | None]:
    """Resolve a tile list; ``"smallest"`` is dropped when a listed tile is within 25 % above it."""
    values = list(values)
    fixed = sorted({v for v in values if isinstance(v, int) and v <= input_px})
    out: list[int | None] = []
    for v in values:
        if v == "smallest":
            _, practical = smallest_legal_tile(input_px, max_tiles=MAX_TILES)
            if not any(practical <= t <= 1.25 * practical for t in fixed):
                out.append(practical)
        elif v is not None and not isinstance(v, int):
            raise ValueError(f"unknown tile spec {v!r}")
    return out + fixed


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def points(mode: str, suites: Sequence[str] | None = None, **overrides: Any) -> list[Point]:
    """The points of ``suites`` (default: the mode's) in ``mode``, deduplicated by workload key."""
    names = list(suites or DEFAULT_SUITES[mode])
    warmup, repeats, max_timing_s = TIMING[mode]
    kind = device_kind(str(overrides.get("device", "cpu")))
    seen: dict[str, Point] = {}
    for name in names:
        if name not in SUITES:
            raise SystemExit(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
        for grid in SUITES[name].grids.get(mode, []):
            if grid.device not in (None, kind):
                continue
            for case_name, input_px in itertools.product(grid.cases, grid.input_px):
                conventional = case(case_name).kind == "conventional"
                for tile in [None] if conventional else _tiles(grid.tile_px, input_px):
                    p = Point(
                        name=case_name,
                        input_px=input_px,
                        tile_px=tile,
                        suite=name,
                        warmup=warmup,
                        repeats=repeats,
                        max_timing_s=max_timing_s,
                    )
                    p = replace(p, **overrides)
                    seen.setdefault(p.key, p)
    order = {n: i for i, n in enumerate(ORDER)}
    return sorted(
        seen.values(),
        key=lambda p: (p.input_px, order.get(p.name, len(order)), p.name, p.tile_px or 0),
    )
