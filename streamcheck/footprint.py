"""What a streamed training step holds in memory at its peak: ``plan``'s ``peak_bytes_estimate``.

NOTE [ Memory estimate ]
The estimate is of the live tensors at the peak of one training step (forward and backward) of
one tile pass: what a CUDA allocator's ``max_memory_allocated`` counts, and on a CPU the peak of
the allocator's live bytes. It is meant to be an upper bound within 25 % of that measure
(``suites/memory_estimate.py`` checks it; ``tests/test_memory_estimate.py`` at small sizes). A
CPU process's resident memory adds what the C allocator keeps beyond its live bytes (freed heap
holes, glibc's ``mallopt`` settings: NOTE [ Host memory ]), which no shape arithmetic can know.
Backward's peak is the larger (forward holds one tile's live frontier, backward all that the
recomputed tile saves), so it is the one modelled:

Rule PM1. One tile, recomputed with grad (streaming Rule S2; only one at a time, Rule S14), holds
          the maps autograd saves for its backward (a node's box x its channels): a map whose
          layer saves its output (ReLU, sigmoid, tanh) or whose consumer saves its input (every
          layer but sums, concatenation, resampling without weights, average pooling, padding
          and reshapes: unknown layers count as saving it); a layer working in place shares its
          source's storage. A window layer at the image border reads a padded copy
          (``constant_pad_nd``, geometry Rule 3), which it saves instead of its source; max-pool
          saves int64 indices (8 bytes per output value). The input tile and the outputs (the
          backward's targets) are held too. The largest tile counts.
Rule PM2. Backward runs the tile's layers last to first; while it runs layer i, the buffers
          that layers <= i save are still held (those of later layers were freed when their
          backward ran), with a gradient frontier: the gradient of i's output, of its inputs (and
          of its input copy), the gradients of earlier maps that later layers have already
          reached (skip connections; where i adds its share to one, the sum is a new buffer
          beside both parts), and one buffer the kernel works in, as large as the
          largest of i's inputs and output. The tile's peak is the largest over i.
Rule PM2b. That buffer, for a convolution PyTorch runs natively on a CPU (not in oneDNN: float64,
          or float32 inputs of at most 20480 values with batch 1, one group and kernels of at
          most 3; ``use_mkldnn`` in ATen's ConvUtils.h), is im2col's: input channels per group x
          kernel x output positions.
Rule PM3. The stitched outputs and their gradients, whole (geometry Rule MS7). A statistic pass
          only accumulates its own outputs, but its backward runs while the module's stitched
          outputs and their gradients are held: the plan adds them to every pass (plan Rule PL1).
Rule PM4. Parameter gradients: the sum over the tiles so far, the tile's own, and one sum being
          formed (``previous + grad``, one parameter at a time): twice the trainable parameters
          plus the largest one.
Rule PM5. The next input tile, read ahead while the current one computes (feed Rule F5): one more
          input tile. The input image and the parameters themselves exist before the call and
          are not counted, nor is an input gradient (the image's size, when the image requires
          grad).
Rule PM6. What the rules above leave out, a tile's smaller temporaries (index tensors, masks,
          a resampling's weighted sums, a crop made contiguous inside a kernel, the order in
          which autograd's engine frees a branch's gradients), is allowed for as 5 % of the
          tile's part: without it a U-Net at tile 256 measured 0.8 % above the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch

from .geometry import volume
from .graph import Graph
from .layers import Window
from .program import Schedule

__all__ = ["largest_buffer_bytes", "peak_bytes"]

_INDEX_BYTES = 8  # max-pool's indices are int64 (Rule PM1)
_UNMODELLED = 0.05  # Rule PM6


def peak_bytes(
    graph: Graph, schedules: Sequence[Schedule], dtype: torch.dtype, *, stitched: bool = True
) -> int:
    """Rules PM1-PM6: the peak bytes of a training step over the tiles ``schedules``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    whole = sum(  # Rule PM3
        prod(graph.nodes[o].shape) for o in graph.outputs or (graph.output,) if stitched
    )
    params = [p.numel() for p in graph.root.parameters() if p.requires_grad]
    gradients = 2 * sum(params) + max(params, default=0)  # Rule PM4
    shapes = {_signature(s): s for s in schedules}  # tiles of one shape hold the same
    tile = max(_tile_bytes(graph, s, dtype) for s in shapes.values()) * (1 + _UNMODELLED)
    read_ahead = max(volume(s.input_box) for s in schedules) * _features(graph, 0)  # Rule PM5
    return int(tile + (2 * whole + gradients + read_ahead) * itemsize)


def largest_buffer_bytes(graph: Graph, schedules: Sequence[Schedule], dtype: torch.dtype) -> int:
    """The largest single buffer a tile of ``schedules`` computes: a node's map or a
    convolution's im2col columns (Rule PM2b), in bytes (what defaults Rule FD2 compares with
    glibc's mmap threshold)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = {_signature(s): s for s in schedules}
    return max(
        (
            max(volume(box) * _features(graph, i) * itemsize, _columns(graph, s, i, dtype))
            for s in shapes.values()
            for i, box in enumerate(s.boxes)
            if box and graph.nodes[i].spatial
        ),
        default=0,
    )


def _signature(schedule: Schedule) -> tuple[object, ...]:
    """What Rules PM1-PM2 read of a tile: every box's edges and every edge's padding."""
    edges = tuple(
        tuple(b - a for a, b in box) if box is not None else None for box in schedule.boxes
    )
    return edges, tuple(sorted((key, edge.pads) for key, edge in schedule.edges.items()))


def _features(graph: Graph, i: int) -> int:
    """Values per spatial position of node ``i``'s map (batch x channels)."""
    node = graph.nodes[i]
    return prod(size for d, size in enumerate(node.shape) if d not in node.layout)


def _columns(graph: Graph, schedule: Schedule, i: int, dtype: torch.dtype) -> int:
    """Rule PM2b: the im2col buffer of PyTorch's native CPU convolution, where it runs."""
    node = graph.nodes[i]
    layer, box = node.layer, schedule.boxes[i]
    if (
        not isinstance(layer, Window)
        or layer.kind not in ("conv", "conv_function")
        or not box
        or i == graph.source  # read, not computed (graph Rule G16)
    ):
        return 0
    source = node.sources[0]
    crop = schedule.edges[(i, source)].crop
    features = _features(graph, source)  # batch x input channels
    groups = getattr(node.module, "groups", layer.groups)
    batch = graph.nodes[source].shape[0]
    read = prod(b - a for a, b in crop) * features
    if dtype == torch.float32 and (
        groups > 1 or min(layer.kernel) > 3 or batch > 1 or read > 20480
    ):
        return 0  # oneDNN's (PyTorch's use_mkldnn, aten/src/ATen/native/ConvUtils.h)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return features // groups * prod(layer.kernel) * volume(box) * itemsize


def _tile_bytes(graph: Graph, schedule: Schedule, dtype: torch.dtype) -> int:
    """Rules PM1-PM2 for one tile: the most held while any node is backpropagated."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nodes = graph.nodes
    start = graph.source  # the pass's input: the image, or a kept map (kept Rule KM2)
    boxes = {
        i: box
        for i, box in enumerate(schedule.boxes)
        if box is not None and (i == start or nodes[i].spatial)
    }
    computed = list(boxes)
    values: dict[object, int] = {}  # bytes of every buffer: a map (by node) or a copy (by key)
    saves: dict[int, set[object]] = {}  # Rule PM1: the buffers each node's backward reads
    for i, box in boxes.items():
        node = nodes[i]
        values[i] = volume(box) * _features(graph, i) * itemsize
        saved: set[object] = {_storage(graph, i)} if _saves_output(node) or i == start else set()
        padded = False
        if i != start and node.kind == "window" and isinstance(node.layer, Window):
            source = node.sources[0]  # the pass's input is read, not computed (graph Rule G16)
            edge = schedule.edges[(i, source)]
            if any(left or right for left, right in edge.pads):
                padded = True
                read = prod(
                    b - a + lo + hi for (a, b), (lo, hi) in zip(edge.crop, edge.pads, strict=True)
                )
                values[("copy", i)] = read * _features(graph, source) * itemsize
                saved.add(("copy", i))
            if node.layer.kind == "max":
                values[("indices", i)] = values[i] // itemsize * _INDEX_BYTES
                saved.add(("indices", i))
        if _saves_input(node) and not padded and i != start:
            saved.update(_storage(graph, s) for s in node.sources)
        saves[i] = saved
    outputs = [o for o in graph.outputs or (graph.output,) if o in values]
    held: set[object] = {_storage(graph, o) for o in outputs}  # the targets
    prefix = []  # bytes held by the saves of nodes <= i (their backward has not run yet)
    for i in computed:
        held |= saves[i]
        prefix.append(sum(values[b] for b in held))
    last_read = {
        i: max((c for c in nodes[i].consumers if c in values), default=i) for i in computed
    }
    peak = 0
    for at, i in enumerate(computed):  # Rule PM2: backpropagating node i
        sources = [s for s in nodes[i].sources if s in values]  # not those before the pass's input
        copy = values.get(("copy", i), 0)
        pending = sum(values[m] for m in computed if m < i and last_read[m] > i)
        frontier = values[i] + copy + sum(values[s] for s in sources)
        merging = sum(values[s] for s in sources if last_read[s] > i)  # partial + new = sum
        work = max(
            values[i], copy, *(values[s] for s in sources), _columns(graph, schedule, i, dtype)
        )
        peak = max(peak, prefix[at] + frontier + pending + merging + work)
    return peak


def _storage(graph: Graph, i: int) -> int:
    """The node whose map ``i``'s value lives in: its source's, for a layer working in place."""
    while i != graph.source and graph.nodes[i].inplace and graph.nodes[i].sources:
        i = graph.nodes[i].sources[0]
    return i


_OUTPUT_SAVERS = ("ReLU", "Sigmoid", "Tanh", "relu", "sigmoid", "tanh", "relu_")
# Whose backward reads no input value (Rule PM1): sums, concatenation, resampling without weights,
# average pooling, padding, reshapes, and what saves its output instead.
_INPUT_FREE = (
    *_OUTPUT_SAVERS,
    "add", "iadd", "sub", "isub", "cat", "concat", "Upsample", "interpolate", "Identity",
    "flatten", "Flatten", "reshape", "view", "contiguous", "neg",
)  # fmt: skip


def _op_name(node: Any) -> str:
    if node.module is not None:
        return type(node.module).__name__
    target = node.fx_node.target
    return str(getattr(target, "__name__", target))


def _saves_output(node: Any) -> bool:
    return _op_name(node) in _OUTPUT_SAVERS


def _saves_input(node: Any) -> bool:
    """Conservative: whatever is not known to read no input value saves its inputs."""
    if node.kind == "window" and isinstance(node.layer, Window):
        return node.layer.kind not in ("avg", "pad")
    return _op_name(node) not in _INPUT_FREE
