"""Compiled tile programs: ``Streamed(module, tile=..., compile=True)``.

NOTE [ Compiled tile programs ]
Rule C1. What a tile program computes depends on its schedule (program Rule P1) only through
         (a) every node's box *size*, (b) every edge's crop, padding and gather indices, which are
         relative to the boxes, (c) the output crops, and (d) the *absolute* boxes of the nodes
         whose arithmetic depends on where they are: rescaling layers (their weights are
         periodic in the output position, resampling Rule RS2) and averages whose divisor
         counts padding at the image border; and of those nodes' sources. ``program_class`` is
         exactly that tuple, so two tiles of one class run the same arithmetic on their inputs:
         all interior tiles of a plain trunk share one class, border tiles a few more.
Rule C2. One ``torch.compile`` program per (graph, class, grad mode, autocast state, tile shape
         and strides, Rule S4's early stop), compiled on first use from the class's first
         schedule and kept with the graph it was made for: a new plan (the module changed,
         NOTE [ Plan cache ]) never meets an old program, and a graph's programs go with it.
         Each program has its own code object, so dynamo's per-code limit on compiled variants
         never sends a class back to eager execution. Parameters are read live by the program
         (dynamo lifts them to inputs), so optimizer steps are seen without recompiling.
Rule C3. Each program's first call (the compilation) is timed; ``Streamed.compile_report()`` lists
         the programs with their classes' tile counts and seconds, so compile time is bounded by
         the number of classes and shown, not hidden in the first step.
Rule C4. Where ``torch.compile`` fails (no C++ compiler, an unsupported platform, an operation
         dynamo cannot trace), the tile runs eagerly, the same arithmetic, and one
         ``RuntimeWarning`` per graph says why and how to turn compilation off.
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph import Graph
from .layers import Window
from .program import Schedule, run_tile

__all__ = ["CompileRecord", "TilePrograms", "program_class"]


def _position_dependent(graph: Graph) -> frozenset[int]:
    """Nodes whose arithmetic reads absolute positions, and their sources (Rule C1 (d))."""
    nodes = set()
    for i, node in enumerate(graph.nodes):
        average = (
            node.kind == "window"
            and isinstance(node.layer, Window)
            and node.layer.kind not in ("conv", "conv_function", "max", "pad")
            and node.layer.divisor_override is None
        )
        if node.kind == "rescale" or average:
            nodes.add(i)
            nodes.update(node.sources)
    return frozenset(nodes)


def program_class(schedule: Schedule, absolute: frozenset[int]) -> Hashable:
    """Rule C1: what a tile program's arithmetic depends on."""
    boxes = tuple(
        None
        if box is None
        else box
        if i in absolute
        else tuple(stop - start for start, stop in box)
        for i, box in enumerate(schedule.boxes)
    )
    edges = tuple(sorted((key, e.crop, e.pads, e.gathers) for key, e in schedule.edges.items()))
    outputs = tuple(box is None for box in schedule.output_boxes)
    return boxes, edges, outputs, schedule.output_crops


_programs_made = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own (Rule C2): dynamo keeps its compiled variants per code
    object, at most ``recompile_limit`` of them, so closures that share one would evict each
    other's programs past that many classes and run eagerly."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_programs_made)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


@dataclass
class CompileRecord:
    """One compiled program (Rule C3)."""

    tiles: int  # tiles of the plan in its class
    grad: bool  # the backward recomputation (True) or the forward pass
    seconds: float  # the first call: compilation and one run
    compiled: bool = True  # False: torch.compile failed, the tile ran eagerly (Rule C4)


@dataclass
class _GraphPrograms:
    absolute: frozenset[int]
    classes: dict[int, Hashable] = field(default_factory=dict)  # id(schedule) -> class
    counts: dict[Hashable, int] = field(default_factory=dict)  # class -> tiles
    programs: dict[Hashable, Callable[[torch.Tensor, dict[str, torch.Tensor]], Any]] = field(
        default_factory=dict
    )
    records: list[CompileRecord] = field(default_factory=list)
    failed: str | None = None


class TilePrograms:
    """The compiled programs of one ``Streamed`` (Rules C1-C4)."""

    def __init__(self, compiler: Callable[..., Any] | None = None) -> None:
        self._compiler = compiler
        self._graphs: dict[int, _GraphPrograms] = {}

    def _for(self, graph: Graph, schedules: tuple[Schedule, ...]) -> _GraphPrograms:
        entry = self._graphs.get(id(graph))
        if entry is None:  # Rule C2: kept while the graph lives, dropped with it
            entry = _GraphPrograms(_position_dependent(graph))
            for s in schedules:
                key = program_class(s, entry.absolute)
                entry.classes[id(s)] = key
                entry.counts[key] = entry.counts.get(key, 0) + 1
            self._graphs[id(graph)] = entry
            weakref.finalize(graph, self._graphs.pop, id(graph), None)
        return entry

    def run(
        self,
        graph: Graph,
        schedules: tuple[Schedule, ...],
        schedule: Schedule,
        x: torch.Tensor,
        *,
        stop_at_output_input: bool = False,
        globals: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """``run_tile(graph, schedule, x)``, through the program of the schedule's class; global
        values (program Rule P8) are inputs of the program."""
        entry = self._for(graph, schedules)
        bound = globals or {}
        if entry.failed is not None or entry.classes.get(id(schedule)) is None:
            # failed before, or not one of the plan's schedules: no class to share
            return run_tile(
                graph, schedule, x, stop_at_output_input=stop_at_output_input, globals=bound
            )
        cls = entry.classes[id(schedule)]
        device = x.device.type
        key = (
            cls,
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
            tuple(x.shape),
            x.stride(),
            x.dtype,
            stop_at_output_input,
        )
        program = entry.programs.get(key)
        if program is not None:
            return program(x, bound)
        first = schedule  # Rule C2: the class's program runs its first schedule

        def tile_program(t: torch.Tensor, g: dict[str, torch.Tensor]) -> Any:
            return run_tile(graph, first, t, stop_at_output_input=stop_at_output_input, globals=g)

        start = time.perf_counter()
        try:
            compiler = self._compiler or torch.compile
            program = compiler(_own_code(tile_program), dynamic=False, fullgraph=False)
            result = program(x, bound)
        except Exception as e:  # Rule C4: any failure to compile falls back, said once
            entry.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                "streamcheck: torch.compile could not compile the tile program "
                f"({entry.failed}); the tiles run eagerly (the same results). Fix: install a "
                "C++ compiler for torch.compile, or pass compile=False to Streamed",
                RuntimeWarning,
                stacklevel=4,
            )
            entry.records.append(
                CompileRecord(entry.counts[cls], key[1], time.perf_counter() - start, False)
            )
            return run_tile(
                graph, schedule, x, stop_at_output_input=stop_at_output_input, globals=bound
            )
        entry.records.append(CompileRecord(entry.counts[cls], key[1], time.perf_counter() - start))
        entry.programs[key] = program
        return result

    def report(self, graph: Graph) -> list[CompileRecord]:
        """Rule C3: the programs compiled for ``graph`` so far."""
        entry = self._graphs.get(id(graph))
        return [] if entry is None else list(entry.records)

    def classes(self, graph: Graph, schedules: tuple[Schedule, ...]) -> int:
        """How many distinct tile programs the plan's tiles need (Rule C1)."""
        return len(self._for(graph, schedules).counts)

    def __getstate__(self) -> dict[str, Any]:  # compiled code does not pickle; rebuilt on use
        return {"_compiler": self._compiler, "_graphs": {}}
