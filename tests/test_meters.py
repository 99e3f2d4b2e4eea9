"""The memory meters of `suites/meters.py`, each checked against an allocation of known size; the
fresh-process ones through the suites' one runner (`suites/fresh.py`)."""

from __future__ import annotations

import pytest
import torch

from suites import fresh
from suites import meters as memory

MiB = 2**20


def test_peak_from_events_is_the_running_sum_peak_in_time_order() -> None:
    # Out of order on purpose: 64 + 32 are live together at t=1, later 32 + 16 only.
    events = [(3, 16), (0, 64), (4, -48), (1, 32), (2, -64)]
    assert memory.peak_from_events(events) == 96
    assert memory.peak_from_events([]) == 0
    assert memory.peak_from_events([(0, -10)]) == 0  # a free of a block older than the run


def test_profiler_peak_of_a_64_mib_tensor() -> None:
    def body() -> None:
        x = torch.ones(64 * MiB, dtype=torch.uint8)
        y = x[:1].clone()  # tiny, while x is alive
        del x, y

    peak = memory.profiler_peak_bytes(body)
    assert 64 * MiB <= peak <= 64 * MiB * 1.03


def test_profiler_peak_counts_concurrently_live_tensors_only() -> None:
    def body() -> None:
        a = torch.empty(32 * MiB, dtype=torch.uint8)
        b = torch.empty(16 * MiB, dtype=torch.uint8)  # a + b live: 48 MiB
        del a, b
        c = torch.empty(40 * MiB, dtype=torch.uint8)  # alone: 40 MiB
        del c

    assert memory.profiler_peak_bytes(body) == pytest.approx(48 * MiB, rel=0.03)


def test_profiler_peak_ignores_tensors_created_before_the_call() -> None:
    before = torch.ones(64 * MiB, dtype=torch.uint8)
    peak = memory.profiler_peak_bytes(lambda: before.add_(1))  # in place: no new tensor
    assert peak < MiB


def fresh_rss(code: str, *, setup: str = "import torch") -> dict[str, int]:
    done = fresh.run("suites.meters", {"setup": setup, "code": code}, timeout_s=300)
    assert done.returncode == 0 and done.result is not None, done.stderr[-2000:]
    return done.result


def test_fresh_process_rss_delta_covers_a_64_mib_tensor() -> None:
    reading = fresh_rss("x = torch.ones(64 * 2**20, dtype=torch.uint8)")
    assert reading["baseline_rss_bytes"] > 0
    assert reading["peak_rss_bytes"] >= reading["baseline_rss_bytes"] + 64 * MiB
    assert 64 * MiB <= reading["delta_bytes"] <= 64 * MiB * 1.25  # + what else the block touched


def test_fresh_process_rss_setup_is_not_measured() -> None:
    reading = fresh_rss(
        "y = torch.ones(8 * 2**20, dtype=torch.uint8)",
        setup="import torch\nx = torch.ones(128 * 2**20, dtype=torch.uint8)",
    )
    assert reading["reset"], "this test needs /proc/self/clear_refs (Linux)"
    assert reading["delta_bytes"] < 64 * MiB


def test_rss_meter_reset_forgets_an_earlier_peak() -> None:
    if not memory.reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this platform")
    x = torch.ones(96 * MiB, dtype=torch.uint8)
    del x
    with memory.RssMeter() as meter:
        pass
    assert meter.reading is not None
    assert meter.reading.reset
    assert meter.reading.delta_bytes < 48 * MiB


def test_current_rss_is_below_peak() -> None:
    assert 0 < memory.current_rss_bytes() <= memory.peak_rss_bytes()


@pytest.mark.gpu
def test_cuda_peak_of_a_64_mib_tensor() -> None:
    keep = torch.ones(16 * MiB, dtype=torch.uint8, device="cuda")  # before: not counted

    def body() -> None:
        x = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda")
        del x

    peak = memory.cuda_peak_bytes(body)
    assert 64 * MiB <= peak <= 64 * MiB * 1.03
    del keep
