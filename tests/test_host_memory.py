"""keep_freed_host_memory (streamcheck/host_memory.py): freed buffers are reused, not faulted in."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# A fresh process (the setting is process-wide): allocate, fill and free a 64 MiB buffer a few
# times, then count the minor page faults of doing it again, the fewest of five rounds (the heap
# settles after the first rounds: an aligned allocation needs a little more than the chunk just
# freed, and now and then the heap's layout puts it on fresh pages). 64 MiB is 16384 pages of 4 KiB.
PROBE = """
import json, resource, sys, torch, streamcheck
took = streamcheck.keep_freed_host_memory() if sys.argv[1] == "keep" else None
def faults_of_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24, dtype=torch.float32).fill_(1.0)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):
    faults_of_one_buffer()
print(json.dumps({"took": took, "faults": min(faults_of_one_buffer() for _ in range(5))}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)


def probe(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@glibc_only
def test_a_freed_64_mib_buffer_is_reused_instead_of_faulted_in_again() -> None:
    default, kept = probe("default"), probe("keep")
    assert kept["took"] is True
    # Default: the buffer is mapped anew and every page faults again (huge pages would cut this
    # 512-fold, so allow for them). Kept: the freed heap pages are reused.
    assert isinstance(default["faults"], int) and default["faults"] >= 16384 // 512
    assert isinstance(kept["faults"], int) and kept["faults"] < default["faults"] / 8
