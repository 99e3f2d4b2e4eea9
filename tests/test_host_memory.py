"""streamcheck/host_memory.py (Rules H1-H6): freed buffers are reused inside a block, not faulted in,
and after the block the memory is back with the system and glibc's thresholds are as before.

The behaviour is read in fresh processes (the settings are the process's) from the kernel's own
counters: minor page faults (``getrusage``) and resident memory (``/proc/self/status``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from streamcheck import host_memory

# ``faults(n)``: the minor page faults of allocating, filling and freeing one buffer of n float32
# (64 MiB by default), the fewest of five rounds after three (the heap settles after the first
# rounds: an aligned allocation needs a little more than the chunk just freed, and now and then
# the heap's layout puts it on fresh pages). 64 MiB is 16384 pages of 4 KiB. ``rss()``: VmRSS in
# bytes. ``faults(BIG)``: a 128 MiB buffer.
PRELUDE = """
import json, resource, sys, threading, torch
from streamcheck.host_memory import keep_freed_host_memory, reusing_freed_host_memory
def one_buffer(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n, dtype=torch.float32).fill_(1.0)  # freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def faults(n=2**24):
    for _ in range(3):
        one_buffer(n)
    return min(one_buffer(n) for _ in range(5))
BIG = 2**25
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)


def probe(body: str, *, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run PRELUDE + ``body`` in a fresh Python; ``body`` sets ``out``, printed as JSON."""
    code = PRELUDE + body + "\nprint(json.dumps(out))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def many_faults(n: object) -> bool:
    """Every page of the buffer faulted in again (huge pages would cut this 512-fold)."""
    return isinstance(n, int) and n >= 16384 // 512


def few_faults(n: object, *, than: object) -> bool:
    return isinstance(n, int) and isinstance(than, int) and n < than / 8


@glibc_only
def test_a_freed_64_mib_buffer_is_reused_for_good_once_kept_for_the_process() -> None:
    """Rule H5, against glibc's default in another fresh process."""
    default = probe("out = {'faults': faults()}")
    kept = probe("out = {'took': keep_freed_host_memory(), 'faults': faults()}")
    assert kept["took"] is True
    assert many_faults(default["faults"])
    assert few_faults(kept["faults"], than=default["faults"])


@glibc_only
def test_inside_a_block_buffers_are_reused_nested_blocks_included() -> None:
    """Rules H1, H3: a 64 MiB buffer faults in page by page outside a block, and is reused inside
    one, in a nested one and after the nested one ends (only the outermost undoes)."""
    out = probe(
        """
out = {"before": faults()}
with reusing_freed_host_memory():
    out["inside"] = faults()
    with reusing_freed_host_memory():
        out["nested"] = faults()
    out["after_nested"] = faults()
"""
    )
    assert many_faults(out["before"])
    for stage in ("inside", "nested", "after_nested"):
        assert few_faults(out[stage], than=out["before"]), (stage, out)


class FakeLibc:
    """Records mallopt and malloc_trim calls (the kernel's counters cannot tell which thresholds
    glibc holds: a hole a block leaves in the heap is reused whatever they are)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int] | tuple[str, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_outermost_block_takes_and_undoes_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules H3-H4: mallopt(M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1) to 1 GiB on entering the
    outermost block, back to Rule H4's values and malloc_trim(0) on leaving it; nothing between."""
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_libc", lambda: libc)
    monkeypatch.setattr(host_memory, "_process_wide", None)
    monkeypatch.setattr(host_memory, "thresholds_outside", lambda: (111, 222))
    gib = 2**30
    with host_memory.reusing_freed_host_memory():
        assert libc.calls == [("mallopt", -3, gib), ("mallopt", -1, gib)]
        with host_memory.reusing_freed_host_memory():
            pass
        assert len(libc.calls) == 2
    assert libc.calls[2:] == [("mallopt", -3, 111), ("mallopt", -1, 222), ("malloc_trim", 0)]
    with pytest.raises(ValueError), host_memory.reusing_freed_host_memory():
        raise ValueError("an error inside the block")
    assert libc.calls[-3:] == [("mallopt", -3, 111), ("mallopt", -1, 222), ("malloc_trim", 0)]
    assert host_memory._depth == 0


@glibc_only
def test_blocks_in_two_threads_are_undone_by_the_last_to_leave() -> None:
    """Rule H3: thread A enters, B enters, A frees 640 MiB and leaves: still resident while B is
    inside; B leaves: handed back."""
    out = probe(
        """
entered, b_may_leave = threading.Event(), threading.Event()
def b():
    with reusing_freed_host_memory():
        entered.set()
        b_may_leave.wait()
base = rss()
with reusing_freed_host_memory():
    thread = threading.Thread(target=b)
    thread.start()
    entered.wait()
    buffers = [torch.ones(2**24) for _ in range(10)]
    del buffers
out = {"a_left_b_inside": rss() - base}
b_may_leave.set()
thread.join()
out["both_left"] = rss() - base
"""
    )
    mib = 2**20
    assert isinstance(out["a_left_b_inside"], int) and out["a_left_b_inside"] > 600 * mib, out
    assert isinstance(out["both_left"], int) and out["both_left"] < 64 * mib, out


@glibc_only
def test_a_block_restores_the_process_wide_opt_in() -> None:
    """Rule H4: after keep_freed_host_memory(), leaving a block keeps its settings."""
    out = probe(
        """
keep_freed_host_memory()
with reusing_freed_host_memory():
    pass
out = {"after": faults(BIG)}
"""
    )
    default = probe("out = {'faults': faults(BIG)}")
    assert few_faults(out["after"], than=default["faults"]), (out, default)


@glibc_only
def test_freed_memory_goes_back_to_the_system_when_the_block_ends() -> None:
    """Rule H3: 640 MiB freed inside a block is resident until it ends, then handed back; with
    the process-wide opt-in (Rule H5) it stays resident. Ten buffers of 64 MiB, all freed."""
    body = """
base = rss()
with {context}:
    buffers = [torch.ones(2**24) for _ in range(10)]
    del buffers
    inside = rss()
out = {{"inside": inside - base, "after": rss() - base}}
"""
    scoped = probe(body.format(context="reusing_freed_host_memory()"))
    kept = probe("keep_freed_host_memory()\n" + body.format(context="torch.no_grad()"))
    mib = 2**20
    assert isinstance(scoped["inside"], int) and scoped["inside"] > 600 * mib, scoped
    assert isinstance(scoped["after"], int) and scoped["after"] < 64 * mib, scoped
    assert isinstance(kept["after"], int) and kept["after"] > 600 * mib, kept


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (32 * 2**20, 64 * 2**20)),
        ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, (2**20, 128 * 1024)),
        ({"MALLOC_TRIM_THRESHOLD_": "0x100000"}, (128 * 1024, 2**20)),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096:glibc.malloc.mmap_threshold=8192"},
            (8192, 4096),
        ),
    ],
)
def test_thresholds_restored_follow_what_the_process_started_with(
    env: dict[str, str], expected: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule H4's precedence, below keep_freed_host_memory (not taken in this process's view)."""
    monkeypatch.setattr(host_memory, "_process_wide", None)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert host_memory.thresholds_outside() == expected
    monkeypatch.setattr(host_memory, "_process_wide", (5, 6))
    assert host_memory.thresholds_outside() == (5, 6)
