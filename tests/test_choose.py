"""``choose_tile`` (NOTE [ Choosing tiles ]) against a brute force over every tile edge pair."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck.graph import build_graph
from streamcheck.planning import make_plan


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1)
    )


@pytest.mark.parametrize("budget_kib", [160, 400])
def test_choice_fits_and_computes_the_fewest_pixels_of_every_tile_that_fits(
    budget_kib: int,
) -> None:
    shape = (1, 3, 40, 28)
    budget = budget_kib * 1024
    chosen = streamcheck.choose_tile(_trunk(), shape, budget_bytes=budget)
    graph = build_graph(_trunk(), shape, dtype=torch.float32)
    fitting = []
    for edges in itertools.product(range(1, 50), range(1, 38)):
        try:
            p = make_plan(graph, edges)
        except streamcheck.StreamcheckError:
            continue  # smaller than the receptive field
        if p.peak_bytes_estimate <= budget:
            fitting.append(sum(p.pixels_computed))
    assert chosen.peak_bytes_estimate <= budget
    assert sum(chosen.pixels_computed) == pytest.approx(min(fitting), rel=1e-12)


def test_nothing_fits_is_an_error_with_the_smallest_estimate() -> None:
    with pytest.raises(streamcheck.StreamcheckError, match="no tile fits budget_bytes=1024 .*MiB"):
        streamcheck.choose_tile(_trunk(), (1, 3, 40, 28), budget_bytes=1024)


def _card(monkeypatch: pytest.MonkeyPatch, *, free: int, cached: int) -> None:
    """A CUDA card with ``free`` bytes free to the driver and ``cached`` held unused by PyTorch."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached + 5000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5000)


def test_device_budget_is_what_cuda_has_free(monkeypatch: pytest.MonkeyPatch) -> None:
    free, cached = 300 * 1024, 100 * 1024
    _card(monkeypatch, free=free, cached=cached)
    shape = (1, 3, 40, 28)
    on_card = streamcheck.choose_tile(_trunk(), shape, device="cuda")
    given = streamcheck.choose_tile(_trunk(), shape, budget_bytes=free + cached)
    assert on_card.tile_px_used == given.tile_px_used
    assert streamcheck.free_bytes("cuda:0") == free + cached


def test_a_plan_says_whether_it_fits_the_card_with_headroom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = streamcheck.plan(_trunk(), (1, 3, 40, 28), tile=20)
    need = plan.peak_bytes_estimate
    _card(monkeypatch, free=math.ceil(need * 1.1) - 1000, cached=1000)  # the 10 % headroom
    assert plan.fits("cuda") and not plan.fits("cuda", headroom=0.2)
    _card(monkeypatch, free=need, cached=0)
    assert plan.fits("cuda", headroom=0) and not plan.fits("cuda")
    with pytest.raises(streamcheck.StreamcheckError, match="only a CUDA device"):
        plan.fits("cpu")


@pytest.mark.parametrize(
    ("options", "match"),
    [({}, "exactly one"), ({"budget_bytes": 1, "device": "cuda"}, "exactly one"),
     ({"device": "cpu"}, "only a CUDA device")],
)  # fmt: skip
def test_budget_is_given_once_and_read_only_from_cuda(options: dict, match: str) -> None:
    with pytest.raises(streamcheck.StreamcheckError, match=match):
        streamcheck.choose_tile(_trunk(), (1, 3, 40, 28), **options)
