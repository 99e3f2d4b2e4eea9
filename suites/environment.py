"""Where a result was produced: the one environment record every suite writes next to its results.

Rules (environment record):

E1. Every record the suites write (benchmark rows, the equivalence record, ImageNette runs, any
    new suite) carries ``environment(device)`` under the key ``"environment"``; no suite spells
    its own versions (one spelling: ``torch``, never ``torch_version``).
E2. ``git_commit`` ends in ``+dirty`` when files that shape the result (``streamcheck/``,
    ``suites/`` by default) have uncommitted changes, so a dirty run is never mistaken for the
    commit it started from.
E3. The 1-minute load average is recorded at the time of the record: the machine may be shared,
    and a timing taken under load is only comparable with one taken under similar load.
E4. A summary says where its records were made in one sentence, ``provenance(records)``: the
    commands, commits, CPU, torch, threads and load, each value once.

>>> provenance([{"command": "python -m x", "environment": {"git_commit": "0123456789ab+dirty",
...     "cpu": "AMD EPYC", "torch": "2.5", "threads": 1, "load_1min": 0.5}}])
'command `python -m x`; commit 0123456789ab+dirty; CPU AMD EPYC, torch 2.5, 1 threads, 1-minute load 0.5'
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What a result depends on, for Rule E2's ``+dirty``.
WATCHED = ("streamcheck", "suites")


def git_commit(*watched: str) -> str:
    """HEAD's sha, with ``+dirty`` when files under ``watched`` have uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *watched],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_1min() -> float | None:
    """The 1-minute load average (Rule E3); None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment(device: str = "cpu", *, watched: tuple[str, ...] = WATCHED) -> dict[str, Any]:
    """The environment record (Rule E1) of a result produced on ``device`` in this process.

    >>> env = environment("cpu")
    >>> sorted(env)  # doctest: +NORMALIZE_WHITESPACE
    ['cores', 'cpu', 'device', 'git_commit', 'gpu', 'load_1min', 'platform', 'python',
     'streamcheck', 'threads', 'torch', 'torchvision']
    >>> env["device"], env["gpu"]
    ('cpu', None)
    """
    import torch

    import streamcheck

    try:
        import torchvision

        torchvision_version: str | None = torchvision.__version__
    except ImportError:
        torchvision_version = None
    # A CUDA row on a machine without CUDA (a skipped point) records gpu None: what was there.
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(device) if cuda else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "streamcheck": getattr(streamcheck, "__version__", "unknown"),
        "git_commit": git_commit(*watched),
        "device": device,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "gpu": gpu,
        "load_1min": load_1min(),
        "platform": platform.platform(),
    }


def provenance(records: Iterable[Mapping[str, Any]]) -> str:
    """Rule E4: the records' commands (``run.command`` or ``command``) and environments."""
    records = list(records)
    envs = [r["environment"] for r in records if r.get("environment")]

    def each(values: Iterable[Any], noun: str = "", plural: str = "") -> str:
        found = sorted({str(v) for v in values if v is not None}) or ["not recorded"]
        return f"{plural if len(found) > 1 else noun}{', '.join(found)}"

    commands = ((r.get("run") or {}).get("command") or r.get("command") for r in records)
    loads = [e["load_1min"] for e in envs if e.get("load_1min") is not None]
    machine = [each((e.get("cpu") for e in envs), "CPU ", "CPUs ")]
    machine.append(each((e.get("torch") for e in envs), "torch "))
    if any(e.get("torchvision") for e in envs):
        machine.append(each((e.get("torchvision") for e in envs), "torchvision "))
    machine.append(each(e.get("threads") for e in envs) + " threads")
    if loads:
        low, high = f"{min(loads):g}", f"{max(loads):g}"
        machine.append(f"1-minute load {low}" + ("" if low == high else f"-{high}"))
    return "; ".join(
        [
            each((f"`{c}`" for c in commands if c), "command ", "commands "),
            each((_short(e.get("git_commit")) for e in envs), "commit ", "commits "),
            ", ".join(machine),
        ]
    )


def _short(sha: str | None) -> str | None:
    """A commit as 12 hex digits, ``+dirty`` kept (Rule E2)."""
    if sha is None:
        return None
    head, plus, rest = sha.partition("+")
    return f"{head[:12]}{plus}{rest}"
