"""What the GPU run measures: its points, as data, and the body that measures one (Rules GR4-GR6).

>>> p = Point("figs23", "paper", "streamcheck", 2048, 512, "float32")
>>> p.key
'figs23|paper|streamcheck|float32|2048|512|device'
>>> [q.size for q in STEPS["table2"].points(dry_run=False) if q.kind == "streamcheck"]
[8192, 16384, 32768, 65536]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The image: ``device``, a float tensor drawn on the module's device; ``host``, a uint8 image in
# (pinned) host memory: streamed, each tile is copied and converted on the device (engine Rule
# S7); conventional training converts the whole image on the device.
IMAGES = ("device", "host")


@dataclass(frozen=True)
class Point:
    """One measurement: a network run one way at one size (Rule GR4: a series grows in size)."""

    step: str
    network: str  # paper | table2 | resnet34 | kept
    kind: str  # conventional | streamcheck
    size: int  # input edge in pixels
    tile: int | None  # streamcheck's tile; None for conventional
    dtype: str  # float64 | float32 | bfloat16 (autocast, parameters float32)
    image: str = "device"  # one of IMAGES

    @property
    def key(self) -> str:
        tile = "-" if self.tile is None else str(self.tile)
        fields_ = (self.step, self.network, self.kind, self.dtype, str(self.size), tile)
        return "|".join((*fields_, self.image))

    @property
    def series(self) -> tuple[str, ...]:
        """Rule GR4: points that differ only in size."""
        return (self.step, self.network, self.kind, self.dtype, str(self.tile), self.image)


@dataclass(frozen=True)
class Step:
    """A step of the run (Rule GR1): its budget in seconds and its points, full and dry."""

    name: str
    budget_s: float
    full: tuple[Point, ...] = ()
    dry: tuple[Point, ...] = ()
    what: str = ""

    def points(self, *, dry_run: bool) -> tuple[Point, ...]:
        return self.dry if dry_run else self.full


def _series(step: str, network: str, kind: str, dtype: str, sizes: tuple[int, ...], **kw: Any):
    tile = kw.pop("tile", None)
    return tuple(Point(step, network, kind, s, tile, dtype, **kw) for s in sizes)


# Rule GR1: in the order they run, each budget counting its process's start; together the run's
# 450 s. Table 2 runs last and grows while memory and time allow.
STEPS: dict[str, Step] = {
    s.name: s
    for s in [
        Step("tests", 90, what="the GPU tests of tests/ (__main__.gpu_tests), TF32 off"),
        Step(
            "equality",
            45,
            what="float64 streamed vs plain on the device: output, input and parameter gradients",
            full=(
                Point("equality", "paper", "streamcheck", 1024, 256, "float64"),
                Point("equality", "table2", "streamcheck", 1024, 512, "float64"),
                # 16 tiles, each owning 20 x 20 output pixels: (1536 - 899) / 32 + 1 = 20
                Point("equality", "resnet34", "streamcheck", 2048, 1536, "float64"),
                # train-mode BatchNorm: 5 statistic levels, maps kept in host memory (kept Rules
                # KM7-KM8, feed Rule F7)
                Point("equality", "kept", "streamcheck", 512, 128, "float64"),
            ),
            # Rule GR5: the comparison is one function for every network; in float64 on 2 cores
            # Table 2 (512 channels) and ResNet-34 (899 px receptive field) take ~10 s and ~1 min
            # at their smallest sizes, and their networks run in their own steps' dry points.
            dry=(
                Point("equality", "paper", "streamcheck", 64, 32, "float64"),
                Point("equality", "kept", "streamcheck", 64, 32, "float64"),
            ),
        ),
        Step(
            "figs23",
            60,
            what="Figs 2-3: the paper's network, float32, conventional vs streamed",
            full=(
                *_series("figs23", "paper", "conventional", "float32", (2048, 4096, 8192)),
                *_series("figs23", "paper", "streamcheck", "float32", (2048, 4096, 8192), tile=512),
                *(
                    Point("figs23", "paper", "streamcheck", 2048, t, "float32")
                    for t in (256, 1024, 2048)
                ),
            ),
            dry=(
                *_series("figs23", "paper", "conventional", "float32", (64, 128)),
                *_series("figs23", "paper", "streamcheck", "float32", (64, 128), tile=32),
                # Rule GR5: the bf16 + host image path of the table2 step, on a network that
                # takes bf16 in seconds on 2 cores without native bf16
                Point("figs23", "paper", "conventional", 128, None, "bfloat16", "host"),
                Point("figs23", "paper", "streamcheck", 128, 32, "bfloat16", "host"),
            ),
        ),
        Step(
            "resnet34",
            70,
            what="ResNet-34 trunk (conv1 to layer4, BatchNorm frozen) + pool and classifier",
            full=(
                *_series("resnet34", "resnet34", "conventional", "bfloat16", (4096, 8192)),
                *_series(
                    "resnet34", "resnet34", "streamcheck", "bfloat16", (8192, 16384), tile=4096
                ),
                Point("resnet34", "resnet34", "streamcheck", 16384, 4096, "float32"),
            ),
            dry=(
                # float32: see the figs23 step's dry points. One tile: the receptive field is
                # 899 px, so a tile of 928 px owns one output pixel (256 tiles at 512²), and one
                # of 1536 px the whole 256² image's 8 x 8.
                Point("resnet34", "resnet34", "conventional", 256, None, "float32"),
                Point("resnet34", "resnet34", "streamcheck", 256, 1536, "float32"),
            ),
        ),
        Step(
            "table2",
            185,
            what="the paper's Table 2 network (trunk streamed, head conventional), bf16",
            full=(
                *_series(
                    "table2", "table2", "conventional", "bfloat16", (8192, 16384), image="host"
                ),
                *_series(
                    "table2",
                    "table2",
                    "streamcheck",
                    "bfloat16",
                    (8192, 16384, 32768, 65536),  # 65536² if ~4x 32768²'s time is left
                    tile=4096,
                    image="host",
                ),
            ),
            # float32: see the figs23 step's dry points. The receptive field is 156 px and the
            # output stride 32: a tile of 192 px owns (192 - 156) / 32 + 1 = 2 output pixels,
            # 9 tiles for 192² (one of 160 px owns 1: 36 tiles, 25x the image's pixels).
            dry=(
                Point("table2", "table2", "conventional", 192, None, "float32", "host"),
                Point("table2", "table2", "streamcheck", 192, 192, "float32", "host"),
            ),
        ),
    ]
}


# ------------------------------------------------------------------------------- networks


def network(name: str) -> tuple[nn.Module, nn.Module]:
    """(streamed part, head) of ``name``, seeded (the same in every process)."""
    from suites.benchmark.workload import paper_network, table2_network

    torch.manual_seed(0)
    if name == "paper":
        return paper_network(), nn.Identity()
    if name == "table2":
        return table2_network()
    if name == "resnet34":
        from suites.trunks import resnet_halves

        return resnet_halves("resnet34")
    if name == "kept":
        return kept_network(), nn.Identity()
    raise ValueError(f"unknown network {name!r}")


# The "kept" network streams with this cache: the plan keeps a few of its maps in host memory.
KEPT_CACHE_BYTES = 2**30


def kept_network() -> nn.Module:
    """Convolutions without bias (a bias before train-mode BatchNorm has gradient 0: rounding
    noise, no relative error to compare) and five train-mode BatchNorms: five statistic levels,
    streamed in six passes (plan Rule PL1), some from kept maps (kept Rule KM2)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
    for stride in (1, 2, 1, 2):
        layers += [nn.BatchNorm2d(16), nn.ReLU()]
        layers.append(nn.Conv2d(16, 16, 3, stride=stride, padding=1, bias=False))
    return nn.Sequential(*layers, nn.BatchNorm2d(16)).train()


def host_image(size: int, device: torch.device) -> torch.Tensor:
    """A (1, 3, size, size) uint8 image in host memory (pinned where CUDA is), drawn on the device
    a band at a time (a 65536² image is 12 GiB: drawn on the CPU it would take minutes)."""
    pin = device.type == "cuda"
    image = torch.empty((1, 3, size, size), dtype=torch.uint8, pin_memory=pin)
    generator = torch.Generator(device=device).manual_seed(1)
    band = max(1, 2**28 // (3 * size))
    for top in range(0, size, band):
        rows = min(band, size - top)
        shape = (1, 3, rows, size)
        drawn = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
        image[:, :, top : top + rows].copy_(drawn)
    return image


def _to_unit(t: torch.Tensor) -> torch.Tensor:
    return t.float() / 255


# ------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """A ready training step of one point, and what is known before it runs."""

    step: Callable[[], torch.Tensor]
    modules: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def build(point: Point, device: torch.device) -> Run:
    """Network, image and one training step (loss = output.float().sum()) for ``point``."""
    import streamcheck

    part, head = network(point.network)
    compute = torch.float64 if point.dtype == "float64" else torch.float32
    part, head = part.to(device, compute), head.to(device, compute)
    autocast = point.dtype == "bfloat16"
    info: dict[str, Any] = {}
    if point.image == "host":
        image = host_image(point.size, device)
        transform: Callable[[torch.Tensor], torch.Tensor] | None = _to_unit
    else:
        generator = torch.Generator(device=device).manual_seed(1)
        shape = (1, 3, point.size, point.size)
        image = torch.randn(shape, generator=generator, device=device, dtype=compute)
        transform = None
    if point.kind == "streamcheck":
        assert point.tile is not None
        streamed = streamcheck.Streamed(part, tile=point.tile, tile_transform=transform)
        plan = streamed.plan(image.shape, dtype=compute)  # the engine's, under autocast too
        info |= {
            "plan_dtype": str(compute).removeprefix("torch."),
            "n_tiles": plan.n_tiles,
            "tile_px_used": plan.tile_px_used[0],
            "overlap_px": list(plan.overlap_px[0]),
            "peak_bytes_estimate": plan.peak_bytes_estimate,
        }
        forward: nn.Module = streamed
    else:
        if transform is not None:
            image = transform(image.to(device))
        forward = part
    modules = nn.ModuleList([part, head])

    def step() -> torch.Tensor:
        for p in modules.parameters():
            p.grad = None
        torch.manual_seed(2)  # Table 2's head has dropout: the same draw every step
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = head(forward(image))
        out.float().sum().backward()
        return out

    return Run(step, modules, info)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one step: CUDA events on a GPU (its own clock), the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        step()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(point: Point, device: torch.device, *, max_timing_s: float = 20.0) -> dict[str, Any]:
    """Rule GR6: warm-up, then 1-3 timed steps; the allocator's peak over the baseline."""
    run = build(point, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    run.step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    repeats = max(1, min(3, math.floor(max_timing_s / max(warmup_s, 1e-3))))
    times = [timed(run.step, device) for _ in range(repeats)]
    metrics = {
        **run.info,
        "warmup_s": warmup_s,
        "time_s_all": times,
        "time_s_median": statistics.median(times),
        "time_meter": "CUDA events" if cuda else "time.perf_counter (wall)",
        "pixels_per_s": point.size**2 / statistics.median(times),
    }
    if cuda:
        metrics["peak_alloc_bytes"] = torch.cuda.max_memory_allocated(device) - base
        metrics["alloc_meter"] = "torch.cuda.max_memory_allocated over the baseline"
    metrics["_grads"] = {
        n: p.grad.detach().to("cpu", torch.float32)
        for n, p in run.modules.named_parameters()
        if p.grad is not None
    }
    return metrics


def equality(point: Point, device: torch.device) -> dict[str, Any]:
    """Float64 streamed vs plain on ``device``: the largest error relative to the largest
    magnitude, over the output, the input gradient and every parameter gradient."""
    import streamcheck

    part, _ = network(point.network)
    part = part.to(device, torch.float64)
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (1, 3, point.size, point.size)
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    x.requires_grad_(True)
    params = [p for p in part.parameters() if p.requires_grad]
    cache = streamcheck.HostCache(bytes=KEPT_CACHE_BYTES) if point.network == "kept" else None
    streamed = streamcheck.Streamed(part, tile=point.tile, cache=cache)
    plan = streamed.plan(shape, dtype=torch.float64)
    results = {}
    state = {k: v.clone() for k, v in part.state_dict().items()}
    for name, module in (("plain", part), ("streamed", streamed)):
        part.load_state_dict(state)  # the same running statistics before each
        out = module(x)
        grad_out = torch.ones_like(out) / out.numel() ** 0.5
        if point.network == "kept":  # a train-mode BatchNorm's output sums to a constant
            seeded = torch.Generator(device=device).manual_seed(2)
            grad_out = torch.randn(out.shape, generator=seeded, device=device, dtype=out.dtype)
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        results[name] = [out.detach(), *grads]
    worst = max(
        ((s - p).abs().max() / p.abs().max().clamp_min(1e-300)).item()
        for s, p in zip(results["streamed"], results["plain"], strict=True)
    )
    return {
        "max_rel_error": worst,
        "n_tiles": plan.n_tiles,
        "compared": len(results["plain"]),
        "kept_maps": len(plan.cuts),
        "passes": len(plan.tile_passes),
    }


def grad_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref|."""
    return max(
        ((grads[n] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for n, r in reference.items()
    )
