"""One point of ``suites.levels``, in a fresh process (suites/fresh.py Rule FP2)."""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import streamcheck
from suites.benchmark.workload import paper_network
from suites.fresh import child
from suites.meters import RssMeter
from suites.trunks import randomize_norms


class SqueezeExcite(nn.Module):
    """Squeeze-excite over the channels of a map; ``known`` reads the squeeze from a buffer (the
    statistic known beforehand: Rule LV1's twin, which streams in one pass)."""

    def __init__(self, channels: int, *, known: bool) -> None:
        super().__init__()
        self.known = known
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)
        self.register_buffer("squeeze", torch.rand(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.squeeze if self.known else x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(m))))


class KnownPool(nn.Module):
    """Global average pooling replaced by its (known) value."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.rand(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def paper_se(k: int, *, known: bool) -> nn.Module:
    """The Figs 2-3 network with ``k`` squeeze-excite blocks in series on its 64-channel map."""
    layers = list(paper_network())
    blocks = [SqueezeExcite(64, known=known) for _ in range(k)]
    return nn.Sequential(*layers[:4], *blocks, *layers[4:])


def resnet18_train_bn(*, known: bool) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    return randomize_norms(trunk).train(not known)  # known: eval BatchNorm (running statistics)


def efficientnet_b0_se(*, known: bool) -> nn.Module:
    import torchvision
    from torchvision.ops.misc import SqueezeExcitation

    trunk = randomize_norms(torchvision.models.efficientnet_b0(weights=None).features[:4]).eval()
    if known:
        for m in trunk.modules():
            if isinstance(m, SqueezeExcitation):
                m.avgpool = KnownPool(m.fc1.in_channels)
    return trunk


def build(network: str, known: bool) -> nn.Module:
    torch.manual_seed(0)
    if network.startswith("paper_se"):
        return paper_se(int(network.removeprefix("paper_se")), known=known)
    return {"resnet18_train_bn": resnet18_train_bn, "efficientnet_b0_se": efficientnet_b0_se}[
        network
    ](known=known)


def _median_step(step: Callable[[], None], steps: int) -> tuple[float, list[float], list[float]]:
    """Rule LV4: one warm-up, then per step its wall time and its process CPU time."""
    step()  # warm-up
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), walls, cpus


def measure(point: dict[str, Any], partial: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    torch.manual_seed(0)
    size, tile = point["size"], point["tile"]
    x = torch.randn(1, 3, size, size)
    if point["kind"] == "memory":
        return _memory(point, x) if "variant" not in point else _kept_memory(point, x)
    if point["kind"] == "budgets":
        return _budgets(point)
    variant = point.get("variant")  # Rule LV4 (``--cache``); LV1's points name ``known``
    known = point["known"] if variant is None else variant == "known"
    net = build(point["network"], known)
    if variant == "conventional":
        return _timed(net, x, point["steps"])
    with _cache(point) as cache:
        streamed = streamcheck.Streamed(net, tile=tile, cache=cache)
        plan = streamed.plan(tuple(x.shape))
        timed = _timed(net, x, point["steps"], run=streamed)
    return {
        **timed,
        "levels": plan.levels,
        "passes_training": plan.passes_training,
        "time_factor_estimate": plan.time_factor,
        "macs": plan.macs,
        "tiles": [p.n_tiles for p in plan.tile_passes],
        "kept_maps": list(plan.cut_paths) if plan.graph is not None else [],
        "kept_bytes": plan.cache_bytes,
        "peak_bytes_estimate": plan.peak_bytes_estimate,
    }


def _timed(
    net: nn.Module, x: torch.Tensor, steps: int, *, run: Callable[[torch.Tensor], Any] | None = None
) -> dict[str, Any]:
    """Training steps of ``run`` (the plain ``net`` by default): times and peak RSS (Rule LV4)."""
    forward = run or net

    def step() -> None:
        net.zero_grad(set_to_none=True)
        forward(x).sum().backward()

    with RssMeter() as meter:
        seconds, times, cpu = _median_step(step, steps)
    assert meter.reading is not None
    return {
        "seconds": seconds,
        "times": times,
        "cpu_times": cpu,
        "peak_rss_over_baseline_bytes": meter.reading.delta_bytes,
    }


@contextlib.contextmanager
def _cache(point: dict[str, Any]) -> Iterator[streamcheck.HostCache | streamcheck.DiskCache | None]:
    """Rule LV4: the point's cache; a DiskCache's files in a directory of their own, on disk."""
    budget, variant = point.get("cache"), point.get("variant", "host")
    if not budget:
        yield None
    elif variant == "disk":
        with tempfile.TemporaryDirectory(prefix="streamcheck-levels-", dir="/var/tmp") as tmp:
            yield streamcheck.DiskCache(tmp, bytes=budget)
    else:
        yield streamcheck.HostCache(bytes=budget)


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Rule LV5: the bytes of the tensors a plain forward saves for backward, traced on the meta
    device (nothing allocated); a tensor saved twice counts twice."""
    meta = copy.deepcopy(net).to("meta")
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(x.to("meta"))
    return total


def _kept_memory(point: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """Rule LV5: peak RSS of one training step, conventional (where it fits) or with kept maps."""
    net = build(point["network"], False)
    if point["variant"] == "conventional":
        saved = _saved_bytes(net, x)
        if saved > 0.4 * available_bytes():
            return {"saved_tensor_bytes": saved, "run": False}

        def forward() -> torch.Tensor:
            return net(x)

        extra: dict[str, Any] = {"saved_tensor_bytes": saved, "run": True}
    else:
        cache = streamcheck.HostCache(bytes=point["cache"])
        streamed = streamcheck.Streamed(net, tile=point["tile"], cache=cache)
        plan = streamed.plan(tuple(x.shape))

        def forward() -> torch.Tensor:
            return streamed(x)

        extra = {
            "run": True,
            "kept_maps": list(plan.cut_paths),
            "kept_bytes": plan.cache_bytes,
            "peak_bytes_estimate": plan.peak_bytes_estimate,
            "passes_training": plan.passes_training,
        }
    with RssMeter() as meter:
        start = time.perf_counter()
        forward().sum().backward()
        seconds = time.perf_counter() - start
    assert meter.reading is not None
    return {"peak_rss_over_baseline_bytes": meter.reading.delta_bytes, "seconds": seconds, **extra}


BUDGET_MULTIPLES = (0, 1, 2, 4, 8, 16)  # Rule LV6, of the image's bytes


def _budgets(point: dict[str, Any]) -> dict[str, Any]:
    """Rule LV6: the plan for each budget, before any work."""
    net, size = build(point["network"], False), point["size"]
    image = 3 * size * size * 4
    plans = []
    for k in BUDGET_MULTIPLES:
        cache = streamcheck.HostCache(bytes=k * image) if k else None
        p = streamcheck.plan(net, (1, 3, size, size), tile=point["tile"], cache=cache)
        plans.append(
            {
                "multiple": k,
                "budget_bytes": k * image,
                "kept_maps": list(p.cut_paths),
                "kept_bytes": p.cache_bytes,
                "passes_training": p.passes_training,
                "time_factor_estimate": p.time_factor,
                "peak_bytes_estimate": p.peak_bytes_estimate,
            }
        )
    return {"plans": plans}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _memory(point: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """Rule LV2: peak RSS of one training step, whole classifier or trunk + head."""
    import torchvision

    model = randomize_norms(torchvision.models.resnet18(weights=None)).eval()
    if point["whole"]:
        streamed = streamcheck.Streamed(model, tile=point["tile"])
        plan = streamed.plan(tuple(x.shape))

        def forward() -> torch.Tensor:
            return streamed(x)
    else:
        trunk, head = streamcheck.split(model, until="layer4", input_shape=tuple(x.shape))
        streamed = streamcheck.Streamed(trunk, tile=point["tile"])
        plan = streamed.plan(tuple(x.shape))

        def forward() -> torch.Tensor:
            return head(streamed(x))

    with RssMeter() as meter:
        start = time.perf_counter()
        forward().sum().backward()
        seconds = time.perf_counter() - start
    assert meter.reading is not None
    return {
        "peak_rss_over_baseline_bytes": meter.reading.delta_bytes,
        "seconds": seconds,
        "plan_output_bytes": plan.output_bytes,
        "plan_peak_bytes_estimate": plan.peak_bytes_estimate,
        "passes_training": plan.passes_training,
    }


if __name__ == "__main__":
    sys.exit(child(measure))
