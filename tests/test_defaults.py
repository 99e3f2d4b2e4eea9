"""The settings ``Streamed`` takes when not told (NOTE [ Fast defaults ], Rules FD1-FD2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck import defaults
from streamcheck.feed import TileFeed


def _layouts(
    streamed: streamcheck.Streamed, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> set[bool]:
    """Whether each tile handed to the module is laid out channels-last (a crop of a
    channels-last image is a view in that order: PyTorch's operators then work channels-last)."""
    seen: list[bool] = []
    prepare = TileFeed.prepare

    def spy(self: TileFeed, tile: torch.Tensor) -> torch.Tensor:
        out = prepare(self, tile)
        seen.append(torch.empty_like(out).is_contiguous(memory_format=torch.channels_last))
        return out

    monkeypatch.setattr(TileFeed, "prepare", spy)
    with torch.no_grad():
        streamed(x)
    return set(seen)


@pytest.fixture
def fresh_process_setting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rule FD3's setting reset, the environment variable unset, and the scopes that reuse freed
    memory counted; every buffer counts as large (Rule FD2b's threshold 0)."""
    calls: list[int] = []
    monkeypatch.setattr(defaults, "_reuse", None)
    monkeypatch.setattr(defaults, "thresholds_outside", lambda: (0, 0))
    monkeypatch.setattr(
        defaults, "reusing_freed_host_memory", lambda: calls.append(1) or nullcontext()
    )
    monkeypatch.delenv(defaults.ENV_REUSE_HOST_MEMORY, raising=False)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("image_layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("setting", [None, False, True])
def test_tiles_keep_the_images_layout_unless_channels_last_is_asked_for(
    dtype: torch.dtype,
    image_layout: torch.memory_format,
    setting: bool | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rule FD1: the default (and ``False``) converts nothing; ``True`` converts every tile."""
    module = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    options = {} if setting is None else {"channels_last": setting}
    streamed = streamcheck.Streamed(module, tile=16, **options)
    image = torch.randn(1, 3, 40, 40, dtype=dtype).contiguous(memory_format=image_layout)
    expected = bool(setting) or image_layout == torch.channels_last
    assert _layouts(streamed, image, monkeypatch) == {expected}


def test_channels_last_tiles_give_the_plain_modules_result() -> None:
    """float32 channels-last tiles against the plain NCHW module: the same sums in another order,
    so equal to float32 rounding over the conv's 27-term accumulation (feed Rule F4)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(1, 3, 50, 50)
    streamed = streamcheck.Streamed(net, tile=24, channels_last=True)
    assert streamed.extra_repr() == "tile=24, channels_last=True"
    assert streamcheck.Streamed(net, tile=24).extra_repr() == "tile=24"
    torch.testing.assert_close(streamed(x), net(x), rtol=27 * 2**-24, atol=1e-6)


def test_each_tile_loop_of_a_call_runs_in_its_own_scope(
    fresh_process_setting: list[int],
) -> None:
    """Rule FD2: forward's and backward's tile loops each run in ``host_memory_scope``; nothing
    is applied process-wide."""
    conv = nn.Conv2d(1, 1, 3)
    streamed = streamcheck.Streamed(conv, tile=8)
    streamcheck.Streamed(nn.Conv2d(1, 1, 3), tile=8)  # constructing changes nothing
    assert fresh_process_setting == []
    for _ in range(3):
        streamed(torch.randn(1, 1, 20, 20))
    assert fresh_process_setting == [1, 1, 1]
    streamed(torch.randn(1, 1, 20, 20)).sum().backward()
    assert len(fresh_process_setting) == 5


def test_memory_is_kept_only_for_tiles_with_a_buffer_glibc_would_unmap(
    fresh_process_setting: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule FD2b: the scope keeps freed memory only when the plan's largest tile buffer reaches
    glibc's mmap threshold outside the scope."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 40, 40)
    streamed = streamcheck.Streamed(conv, tile=16)
    largest = streamed.plan(x.shape).largest_buffer_bytes
    # independently: the largest output map of a tile is 8 channels x its output box, float32
    biggest_map = (
        8
        * 4
        * max(
            (b[0][1] - b[0][0]) * (b[1][1] - b[1][0])
            for b in (t.output_box for t in streamed.plan(x.shape).tiles)
        )
    )
    assert biggest_map <= largest <= streamed.plan(x.shape).peak_bytes_estimate
    monkeypatch.setattr(defaults, "thresholds_outside", lambda: (largest + 1, 2 * largest + 2))
    streamed(x).sum().backward()
    assert fresh_process_setting == []  # every buffer below the threshold: glibc reuses them
    monkeypatch.setattr(defaults, "thresholds_outside", lambda: (largest, 2 * largest))
    streamed(x).sum().backward()
    assert fresh_process_setting == [1, 1]  # forward's and backward's loops


@pytest.mark.parametrize("how", ["argument", "environment", "setting"])
def test_keeping_freed_host_memory_can_be_declined(
    fresh_process_setting: list[int], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    options: dict[str, Any] = {}
    if how == "argument":
        options["keep_host_memory"] = False
    elif how == "environment":
        monkeypatch.setenv(defaults.ENV_REUSE_HOST_MEMORY, "0")
    with defaults.set_host_memory_reuse(False if how == "setting" else None):
        streamcheck.Streamed(nn.Conv2d(1, 1, 3), tile=8, **options)(torch.randn(1, 1, 20, 20))
    assert fresh_process_setting == []
    streamcheck.Streamed(nn.Conv2d(1, 1, 3), tile=8, keep_host_memory=True)(
        torch.randn(1, 1, 20, 20)
    )
    assert fresh_process_setting == [1]  # asked for explicitly: taken even against the setting


def test_the_process_setting_as_a_call_and_as_a_block(
    fresh_process_setting: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule FD3: a call sets it until the next; a block restores the previous value, nested
    blocks included and when the block raises; None goes back to the environment variable."""
    assert defaults.host_memory_reuse() is True  # the default
    defaults.set_host_memory_reuse(False)
    assert defaults.host_memory_reuse() is False
    with defaults.set_host_memory_reuse(True):
        assert defaults.host_memory_reuse() is True
        with pytest.raises(KeyError), defaults.set_host_memory_reuse(False):
            assert defaults.host_memory_reuse() is False
            raise KeyError("inside")
        assert defaults.host_memory_reuse() is True
    assert defaults.host_memory_reuse() is False
    monkeypatch.setenv(defaults.ENV_REUSE_HOST_MEMORY, "0")
    defaults.set_host_memory_reuse(None)
    assert defaults.host_memory_reuse() is False  # the environment's
    monkeypatch.setenv(defaults.ENV_REUSE_HOST_MEMORY, "1")
    assert defaults.host_memory_reuse() is True
    with defaults.set_host_memory_reuse(False):
        assert defaults.host_memory_reuse() is False  # a set value wins over the environment


@pytest.mark.parametrize("value", ["yes", "", "2"])
def test_a_bad_environment_value_is_an_error(
    fresh_process_setting: list[int], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(defaults.ENV_REUSE_HOST_MEMORY, value)
    with pytest.raises(streamcheck.StreamcheckError, match="set it to 1 or 0"):
        defaults.host_memory_reuse()
    with pytest.raises(streamcheck.StreamcheckError, match="True, False or None"):
        defaults.set_host_memory_reuse("no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "process", "device", "reused"),
    [
        (None, True, "cpu", True),
        (None, False, "cpu", False),
        (True, False, "cpu", True),
        (False, True, "cpu", False),
        (None, True, "meta", False),  # not a CPU: host memory is not the tiles'
        (True, True, "meta", False),
    ],
)
def test_the_scope_reuses_host_memory_on_a_cpu_when_the_settings_say_so(
    fresh_process_setting: list[int],
    monkeypatch: pytest.MonkeyPatch,
    setting: bool | None,
    process: bool,
    device: str,
    reused: bool,
) -> None:
    """Rules FD2-FD3: the scope's own setting, else the process's; only on a CPU."""
    entered: list[int] = []

    @contextmanager
    def spy() -> Iterator[None]:
        entered.append(1)
        yield

    monkeypatch.setattr(defaults, "reusing_freed_host_memory", spy)
    with (
        defaults.set_host_memory_reuse(process),
        defaults.host_memory_scope(setting, device=torch.device(device), largest_bytes=1),
    ):
        pass
    assert entered == ([1] if reused else [])
    assert fresh_process_setting == []  # nothing for the whole process
