"""``Streamed``: run a module tile by tile with exact, autograd-native gradients.

NOTE [ Streaming autograd ]
Rule S1. Forward: under no_grad, every tile's output box is computed from its input tile (the
         program of ``program.py``) and written into one stitched output tensor. Nothing but the
         input is kept for backward.
Rule S2. Backward: every tile is recomputed with grad enabled and backpropagated with the slice of
         the output gradient it owns (geometry Rule 7); parameter gradients are summed over tiles,
         input-gradient tiles are added into one input gradient where they overlap.
Rule S3. Both are one ``torch.autograd.Function``: a single ``loss.backward()`` (or
         ``torch.autograd.grad``) does everything, and the parameters receive ``.grad`` through
         autograd as usual, so optimizers, hooks, DistributedDataParallel and gradient accumulation
         work unchanged.
Rule S4. So the streamed part runs exactly two forwards per tile, except that a trailing
         convolution is not re-run in backward: its gradients need only its input tile and the
         output gradient (``aten.convolution_backward``).
Rule S5. The wrapper replaces nothing: ``Streamed(m).module is m``, parameters are m's own objects,
         and ``state_dict`` keys are those of m (the ``module.`` level is hidden), so a model with a
         streamed trunk saves and loads like the model without it.
Rule S6. Autocast state at forward time is re-entered for the recomputation, so a mixed-precision
         run recomputes exactly what its forward computed: every tile, and the global subgraph
         (a squeeze-excite's layers run on statistics, Rule S12).
Rule S7. The image may live elsewhere than the module (say a uint8 image in host memory and the
         module on a GPU): each tile is copied to the module's device (the next one while the
         current one computes), passed through ``tile_transform`` there (conversion and
         normalisation, which must be per pixel), and freed, so device memory depends on the tile
         and the stitched output, not on the image. ``feed.py`` does this (Rules F1-F6).
Rule S8. The image may also be an image source (``open_image``: a TIFF level, a memmap, a zarr
         array), read region by region on demand (sources Rules I1-I4); it is read again in
         backward, and its input gradient goes to an array the caller gives (saliency Rules A1-A4).
Rule S9. Tiles not computed: with ``mask=`` the tiles whose input holds no tissue are skipped in
         forward and backward (masks Rules T1-T3). And, always: in backward a tile whose slice of
         the output gradient is all zeros is not recomputed, since its terms in geometry Rule 7's
         sum are zero. The one difference: were that tile's activations or Jacobian inf or NaN,
         the plain module's backward would form 0 * inf = NaN, the streamed one skips it and stays
         finite. A NaN or inf in the output gradient is not zero, so such a tile is recomputed.
         Which tiles have a non-zero gradient is read in one pass before the first tile (one
         device synchronisation per backward, not one per tile).
Rule S10. Several outputs (graph Rule G11; geometry Rules MS5-MS7): forward stitches every output
          from the crops the tiles own and returns them in the module's own structure (tuple,
          list, dict); backward gets one gradient per output (zeros for an output the loss does
          not use) and backpropagates each tile's slices of all of them at once; a tile is skipped
          only when all its slices are zero. The plain single-output path is unchanged.
Rule S11. Statistics over the map (plan Rules PL1-PL3; reductions Rules R1-R5): forward runs the
          tile passes in order; a statistic pass accumulates each reduction over the boxes its
          tiles own (each position once, never the halo), in float64, updates running statistics
          once, then computes its level's global values, which later passes read as constants.
Rule S12. Backward recomputes the global subgraph once with every reduction's total as a leaf and
          takes each total's gradient from it; the output pass B0 backpropagates the owned output
          slices; then, deepest level first, a pass B_j seeds every tile with its reductions'
          targets (reductions Rule R3) times those gradients. One tile loop serves every pass.
Rule S13. The versions of parameters and buffers are taken after forward's own buffer updates
          (running statistics, ``num_batches_tracked``), so that backward refuses only writes made
          between forward and backward.
Rule S14. In backward nothing of a tile outlives it: its recomputed maps, their gradients and its
          input tile are freed before the next tile is recomputed, so the peak holds one tile's
          maps, not two (``plan``'s estimate, Rule PM1, counts one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compiled import CompileRecord, TilePrograms
from .defaults import host_memory_reuse, host_memory_scope
from .errors import StreamcheckError, internal_error
from .feed import HostWrites, TileFeed, laid_out_like
from .graph import Graph, build_graph, unflatten
from .kept import Cache, DiskCache, HostCache, KeptMaps, autocast_dtype
from .layers import Window
from .masks import ScaledMask
from .planning import MAX_LEVELS, StreamPlan, make_plan, normalize_tile
from .program import Schedule, run_globals, run_once, run_tile
from .reductions import Accumulator, Reduction, Running, moments, stat_dims, update_running
from .saliency import GradientSink
from .sources import ImageSource
from .state import PlanCache, module_state, tensor_versions

__all__ = ["Streamed"]


class Streamed(nn.Module):
    """Wrap ``module`` so that it runs tile by tile, with outputs and gradients equal to ``module``.

    ``tile`` is the edge of an input tile in pixels, overlap included: an int, or one per spatial
    axis. It sets the memory use; ``streamcheck.plan`` shows the tiles it gives. ``tile`` and the
    module may be changed between calls: plans are keyed on both (NOTE [ Plan cache ]).

    ``tile_transform`` runs on each tile after it reaches the module's device: keep the image in
    host memory as uint8 and convert per tile (docs/SCALING.md). Tiles keep the image's memory
    layout unless ``channels_last=True`` lays them out NHWC (NDHWC for 3-D), and on a CPU freed
    tile buffers are reused while a call's tiles run and handed back to the system after it
    (Rule FD2) unless ``keep_host_memory=False`` or ``set_host_memory_reuse(False)``
    (NOTE [ Fast defaults ]); results are unchanged.

    Statistics over the whole map (train-mode BatchNorm, GroupNorm, squeeze-excite, global
    pooling: NOTE [ Global statistics ]) stream exactly in one tile pass per level
    (NOTE [ Passes ]); ``max_levels`` refuses deeper networks before any work. With
    ``cache=HostCache(bytes=...)`` (or ``DiskCache(path, bytes=...)``) the stitched maps of a few
    cut points are kept within that budget, so that later passes start there instead of at the
    image (NOTE [ Kept maps ]); ``plan`` shows the cuts and the time factor before any work.

    ``compile=True`` compiles each tile program with ``torch.compile``, once per class of tiles
    that run the same arithmetic (interior tiles share one; NOTE [ Compiled tile programs ]);
    ``compile_report`` says what was compiled and how long it took.

    The image may also be an image source (``streamcheck.open_image``: a TIFF level, a memmap, a
    zarr array), read tile by tile from where it lies; ``mask=`` skips background tiles and
    ``input_grad=`` collects a source's input gradient (docs/SLIDES.md).

    >>> import torch, torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    >>> streamed = Streamed(trunk, tile=32)
    >>> image = torch.randn(1, 3, 100, 100, dtype=torch.float64, requires_grad=True)
    >>> trunk.double()(image).sub(streamed(image)).abs().max().item()  # 100 px -> 4 x 4 tiles
    0.0
    >>> streamed(image).sum().backward()
    >>> trunk[0].weight.grad.shape
    torch.Size([4, 3, 3, 3])
    >>> trunk[1] = nn.Sigmoid()                  # model surgery after wrapping is followed
    >>> trunk(image).sub(streamed(image)).abs().max().item()
    0.0
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        tile: int | Sequence[int],
        tile_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
        keep_host_memory: bool | None = None,
        compile: bool = False,
        max_levels: int | None = MAX_LEVELS,
        cache: Cache | None = None,
    ) -> None:
        super().__init__()
        self.max_levels = max_levels  # plan Rule PL2
        self.cache = cache  # kept Rule KM1
        self.module = module
        self.tile = tile
        self.tile_transform = tile_transform
        self.channels_last = channels_last  # Rule FD1
        self.keep_host_memory = keep_host_memory  # Rule FD2
        self._programs = TilePrograms() if compile else None  # Rules C1-C4
        self._plans: PlanCache[StreamPlan] = PlanCache()
        self._register_state_dict_hook(_hide_module_prefix)
        self._register_load_state_dict_pre_hook(_restore_module_prefix)

    @property
    def cache(self) -> Cache | None:
        """Where stitched maps are kept (kept Rule KM1); may be changed between calls (plans are
        keyed on it)."""
        return self._cache

    @cache.setter
    def cache(self, cache: Cache | None) -> None:
        if cache is not None and not isinstance(cache, (HostCache, DiskCache)):
            raise StreamcheckError(
                f"streamcheck: cache must be HostCache(bytes=...) or DiskCache(path, bytes=...), "
                f"got {cache!r}"
            )
        self._cache = cache

    def plan(self, input_shape: Sequence[int], *, dtype: torch.dtype | None = None) -> StreamPlan:
        """The tile plan for an input of ``input_shape``, in the module's dtype unless given."""
        device, module_dtype = _placement(self.module)
        dtype = dtype or module_dtype or torch.float32
        return self._plan(module_state(self.module), tuple(input_shape), dtype, device)

    def _plan(
        self,
        state: Any,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | None,
    ) -> StreamPlan:
        """Rule K1: the plan for this module state and these settings, derived when new."""
        tile = tuple(self.tile) if isinstance(self.tile, Sequence) else self.tile
        amp = autocast_dtype(device or torch.device("cpu"))  # kept Rule KM7

        def build() -> StreamPlan:
            graph = build_graph(self.module, shape, dtype=dtype)
            edges = normalize_tile(self.tile, len(shape) - 2)
            return make_plan(
                graph, edges, max_levels=self.max_levels, cache=self.cache, autocast=amp
            )

        key = (shape, dtype, tile, device, self.max_levels, self.cache, amp)
        return self._plans.get(state, key, build)

    def forward(
        self,
        x: torch.Tensor | ImageSource,
        *,
        mask: Any = None,
        input_grad: Any = None,
    ) -> torch.Tensor:
        """Stream ``x``: a ``(N, C, *spatial)`` tensor or an image source (``open_image``).

        ``mask`` (a boolean array over the image's spatial axes, any resolution) skips the tiles
        whose input holds no tissue (NOTE [ Tissue masks ]; ``computed_region`` says which are
        computed). ``input_grad`` (an array, for image sources) receives the input gradient in
        backward (NOTE [ Gradient sinks ]).
        """
        _check_image(x)
        state = module_state(self.module)
        device, module_dtype = _placement(self.module)
        device = device or x.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = _compute_dtype(x, module_dtype, self.tile_transform, autocast=autocast)
        plan = self._plan_for(x, state, dtype, device)
        if mask is not None:
            _check_maskable(plan)
        tiles = None if mask is None else _masked_tiles(plan, mask)
        sink = None
        if input_grad is not None:
            if not isinstance(x, ImageSource):
                raise StreamcheckError(
                    "streamcheck: input_grad is for image sources; for a tensor image use "
                    "image.requires_grad_() and read image.grad"
                )
            sink = GradientSink(input_grad, x)
        params = tuple(p for p in self.module.parameters() if p.requires_grad)
        feed = TileFeed(
            device,
            transform=self.tile_transform,
            channels_last=self.channels_last,  # Rule FD1
            dtype=None if autocast else dtype,
        )
        reuse = host_memory_reuse() if self.keep_host_memory is None else self.keep_host_memory
        kept = None
        if plan.cuts and self.cache is not None:
            kept = KeptMaps(self.cache, dict(zip(plan.cuts, plan.cut_dtypes, strict=True)))
        call = _Call(plan, state, {}, params, tiles, sink, self._programs, reuse, kept)  # FD3
        graph = plan.graph
        assert graph is not None
        outputs = _StreamFunction.apply(call, feed, x, *params)
        if isinstance(x, ImageSource) and not any(o.requires_grad for o in outputs):
            x.release()  # sources Rule I7: no backward reads it again
        if graph.spec is None:
            return outputs[0]
        return unflatten(graph.spec, outputs)

    def computed_region(self, x: torch.Tensor | ImageSource, *, mask: Any) -> torch.Tensor:
        """A boolean tensor, 1 on the output's batch and channel axes: True where tiles are computed.

        The gradient contract of ``mask=`` (Rule T3) is that of ``module(x) * computed_region``.

        >>> import torch, torch.nn as nn
        >>> s = Streamed(nn.Conv2d(1, 1, 3, padding=1), tile=8)
        >>> tissue = torch.zeros(4, 4, dtype=torch.bool); tissue[0, 0] = True   # top-left 4 x 4 px
        >>> s.computed_region(torch.zeros(1, 1, 16, 16), mask=tissue)[0, 0].sum().item()
        36
        """
        _check_image(x)
        state = module_state(self.module)
        device, module_dtype = _placement(self.module)
        autocast = torch.is_autocast_enabled((device or x.device).type)
        dtype = _compute_dtype(x, module_dtype, self.tile_transform, autocast=autocast)
        plan = self._plan_for(x, state, dtype, device or x.device)
        _check_maskable(plan)
        graph = plan.graph
        assert graph is not None
        layout = graph.output_node.layout
        ndim = len(plan.output_shape)
        shape = [plan.output_shape[d] if d in layout else 1 for d in range(ndim)]
        region = torch.zeros(shape, dtype=torch.bool, device=device or x.device)
        for i in _masked_tiles(plan, mask):
            region[_slices(plan.schedules[i].output_box, layout, ndim)] = True
        return region

    def _plan_for(
        self,
        x: torch.Tensor | ImageSource,
        state: Any,
        dtype: torch.dtype,
        device: torch.device,
    ) -> StreamPlan:
        try:
            return self._plan(state, tuple(x.shape), dtype, device)
        except StreamcheckError as e:
            if not isinstance(x, ImageSource):
                raise
            raise StreamcheckError(
                f"{e}\n(the image is {x!r}: {x.channels} channel(s); open_image(..., channels=3) "
                "keeps the first three, layout='CHW' reads an array channels first)"
            ) from e

    def extra_repr(self) -> str:
        options = [f"tile={self.tile}"]
        options += ["channels_last=True"] if self.channels_last else []
        options += (
            [] if self.keep_host_memory is None else [f"keep_host_memory={self.keep_host_memory}"]
        )
        options += [] if self.cache is None else [f"cache={self.cache!r}"]
        return ", ".join(options + (["compile=True"] if self._programs is not None else []))

    def compile_report(self, input_shape: Sequence[int]) -> list[CompileRecord]:
        """With ``compile=True``: the tile programs compiled so far for inputs of ``input_shape``,
        each with its class's tile count and its first call's seconds (Rule C3).

        >>> import torch, torch.nn as nn
        >>> s = Streamed(nn.Conv2d(1, 1, 3, padding=1), tile=8)   # compile=False: nothing compiled
        >>> s.compile_report((1, 1, 20, 20))
        []
        """
        if self._programs is None:
            return []
        return [
            record
            for plan in self._plans
            if plan.graph is not None and plan.input_shape == tuple(input_shape)
            for record in self._programs.report(plan.graph)
        ]


def _hide_module_prefix(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    for key in list(state):
        if key.startswith(prefix + "module."):
            state[prefix + key[len(prefix) + len("module.") :]] = state.pop(key)


def _restore_module_prefix(state: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in list(state):
        if key.startswith(prefix) and not key.startswith(prefix + "module."):
            state[prefix + "module." + key[len(prefix) :]] = state.pop(key)


def _check_image(x: Any) -> None:
    if not isinstance(x, (torch.Tensor, ImageSource)):
        hint = (
            "streamcheck.open_image(array) (an HWC array read tile by tile; layout='CHW' "
            "otherwise), or torch.from_numpy(array) (then .permute(2, 0, 1) for an HWC image, "
            "and [None] for the batch axis)"
            if type(x).__module__.startswith("numpy")
            else "torch.as_tensor(...) with shape (N, C, *spatial), or streamcheck.open_image(...) "
            "for a slide file, memmap or zarr array"
        )
        raise StreamcheckError(
            f"streamcheck: Streamed expects a torch.Tensor of shape (N, C, *spatial) or an image "
            f"source, got {type(x).__module__}.{type(x).__name__}. Fix: convert it with {hint}"
        )


def _check_maskable(plan: StreamPlan) -> None:
    """Masks skip tiles of one pass with one output (masks Rules T1-T3)."""
    graph = plan.graph
    assert graph is not None
    if plan.passes:
        first = graph.nodes[graph.reductions[0]]
        raise StreamcheckError(
            f"streamcheck: mask= with a statistic over space ('{first.path}'): the plain "
            "module's statistics include the background the mask would skip, so the result "
            "would differ. Fix: stream without a mask, or call .eval() on its BatchNorm layers "
            "and move global pooling into the head"
        )
    if graph.multiscale:
        raise StreamcheckError(
            "streamcheck: mask= (and computed_region) is not supported for modules that "
            "upsample or return several outputs. Fix: stream without a mask"
        )


def _masked_tiles(plan: StreamPlan, mask: Any) -> tuple[int, ...]:
    """The tiles whose input box touches the mask (masks Rule T2)."""
    scaled = ScaledMask(mask, plan.input_shape[2:], batch=plan.input_shape[0])
    return tuple(i for i, s in enumerate(plan.schedules) if scaled.touches(s.input_box))


def _placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The one device and floating dtype of the module's parameters and buffers, or an error."""
    devices: dict[torch.device, list[str]] = {}
    dtypes: dict[torch.dtype, list[str]] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        devices.setdefault(t.device, []).append(name)
        if t.is_floating_point():
            dtypes.setdefault(t.dtype, []).append(name)
    for what, found, fix in (
        ("devices", devices, "module.to(device)"),
        ("dtypes", dtypes, "module.to(dtype)"),
    ):
        if len(found) > 1:
            listed = "; ".join(
                f"{key}: {', '.join(repr(n) for n in names[:4])}{', ...' if len(names) > 4 else ''}"
                for key, names in found.items()
            )
            raise StreamcheckError(
                f"streamcheck: the module's parameters and buffers sit on several {what} "
                f"({listed}); a streamed module computes on one. Fix: {fix}"
            )
    return next(iter(devices), None), next(iter(dtypes), None)


def _compute_dtype(
    x: torch.Tensor | ImageSource,
    module_dtype: torch.dtype | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    autocast: bool,
) -> torch.dtype:
    """The dtype tiles reach the module in; an image the module cannot take is an error."""
    if transform is not None:
        return module_dtype or torch.float32
    if not x.is_floating_point():
        want = module_dtype or torch.float32
        raise StreamcheckError(
            f"streamcheck: the image is {x.dtype}, but the module computes in {want}. Fix: keep "
            f"the image as it is and convert each tile on the module's device with "
            f"Streamed(..., tile_transform=lambda t: t.to({want}) / 255) (normalise as the model "
            f"expects), or convert the whole image with image.to({want})"
        )
    if module_dtype is not None and x.dtype != module_dtype and not autocast:
        raise StreamcheckError(
            f"streamcheck: the image is {x.dtype}, but the module's parameters are {module_dtype}. "
            f"Fix: image.to({module_dtype}), module.to({x.dtype}), or convert per tile with "
            f"tile_transform=lambda t: t.to({module_dtype})"
        )
    return x.dtype


def _slices(box: Sequence[tuple[int, int]], layout: Sequence[int], ndim: int) -> tuple[Any, ...]:
    index: list[Any] = [slice(None)] * ndim
    for dim, (start, stop) in zip(layout, box, strict=True):
        index[dim] = slice(start, stop)
    return tuple(index)


@dataclass(frozen=True)
class _Call:
    """What one forward call used, for its backward (Rule K4)."""

    plan: StreamPlan
    state: Any
    versions: dict[str, int]  # taken after forward's own buffer updates (Rule S13)
    params: tuple[torch.Tensor, ...]
    tiles: tuple[int, ...] | None = None  # those computed (masks Rule T2); None: all
    sink: GradientSink | None = None  # where a source's input gradient goes (Rule S8)
    programs: TilePrograms | None = None  # compile=True (NOTE [ Compiled tile programs ])
    host_memory: bool | None = None  # resolved at forward, for both tile loops (Rules FD2-FD3)
    kept: KeptMaps | None = None  # this call's kept maps (kept Rules KM1, KM6)

    @property
    def graph(self) -> Graph:
        graph = self.plan.graph
        if graph is None:
            raise internal_error("a plan without its graph")
        return graph

    def run_tile(
        self, tile_pass: StreamPlan, schedule: Schedule, x: torch.Tensor, **options: Any
    ) -> tuple[torch.Tensor | None, ...]:
        """One tile's program in one pass: compiled per schedule class (Rule C1), or run
        eagerly; one crop (or None) per output of the pass."""
        graph = tile_pass.graph
        assert graph is not None
        if self.programs is None:
            result = run_tile(graph, schedule, x, **options)
        else:
            result = self.programs.run(graph, tile_pass.schedules, schedule, x, **options)
        return (result,) if graph.spec is None else tuple(result)

    def check_unchanged(self) -> None:
        """The module the recomputation will run is the one forward ran (Rule K4)."""
        graph = self.graph
        if module_state(graph.root) != self.state:
            raise StreamcheckError(
                "streamcheck: the streamed module changed between forward and backward (a "
                "submodule, parameter, flag or hook was replaced or added), so the backward "
                "recomputation would not be what forward computed. Fix: change the module only "
                "after backward, or run forward again"
            )
        now = tensor_versions(graph.root)
        written = [name for name, version in self.versions.items() if now.get(name) != version]
        if written:
            raise StreamcheckError(
                "streamcheck: parameters or buffers of the streamed module were written in place "
                f"between forward and backward ({', '.join(repr(n) for n in written)}), so the "
                "backward recomputation would not be what forward computed. Fix: take the "
                "optimizer step (or edit weights) only after backward"
            )


def _owned(schedule: Schedule) -> tuple[Any, ...]:
    """The box of each of the pass's outputs that ``schedule`` owns (None: nothing)."""
    return schedule.output_boxes or (schedule.output_box,)


class _Statistics:
    """What forward computed outside tiles (Rules S11-S12): every reduction's accumulator and
    total, and every global value, by node name."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.accumulators: dict[int, Accumulator] = {}
        self.values: dict[str, torch.Tensor] = {}

    def leaves(self) -> dict[str, torch.Tensor]:
        """The global values, detached, as leaves whose gradients backward collects (Rule S12)."""
        return {
            node.name: self.values[node.name].detach().requires_grad_()
            for node in self.graph.nodes
            if node.kind in ("global", "reduction")
            and isinstance(self.values.get(node.name), torch.Tensor)
            and self.values[node.name].is_floating_point()
        }

    def start(self, tile_pass: StreamPlan) -> None:
        nodes = self.graph.nodes
        for r in tile_pass.reductions:
            source = nodes[nodes[r].sources[0]]
            layer = nodes[r].layer
            assert isinstance(layer, Reduction)
            self.accumulators[r] = Accumulator(layer, source.shape, source.layout)

    def taps(self, tile_pass: StreamPlan) -> list[tuple[int, int]]:
        """(reduction, position of its input among the pass's outputs)."""
        graph = tile_pass.graph
        assert graph is not None
        outputs = graph.outputs or (graph.output,)
        return [(r, outputs.index(self.graph.nodes[r].sources[0])) for r in tile_pass.reductions]

    def count(self, r: int) -> int:
        nodes = self.graph.nodes
        layer = nodes[r].layer
        assert isinstance(layer, Reduction)
        return layer.count(nodes[nodes[r].sources[0]].shape)

    def value(self, r: int, total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        layer = self.graph.nodes[r].layer
        assert isinstance(layer, Reduction)
        return layer.finalize(total, self.count(r), dtype)

    def finish(self, tile_pass: StreamPlan, dtype: torch.dtype) -> None:
        """Rule S11: the pass's statistics, their running updates, then its level's globals."""
        graph = self.graph
        for r in tile_pass.reductions:
            self.values[graph.nodes[r].name] = self.value(r, self.accumulators[r].result(), dtype)
        computed = [*tile_pass.reductions, *run_globals(graph, self.values, level=tile_pass.level)]
        for i in computed:
            node = graph.nodes[i]
            running = _running_of(node)
            if running is not None:  # reductions Rule R5: once per forward
                source = graph.nodes[node.sources[0]] if node.sources else None
                shape = source.shape if source is not None else _input_shape(node, self.values)
                layer = node.layer if isinstance(node.layer, Reduction) else None
                count = layer.count(shape) if layer is not None else _moments_count(node, shape)
                update_running(graph.root, running, self.values[node.name], count)


def _running_of(node: Any) -> Running | None:
    if isinstance(node.layer, Reduction):
        return node.layer.running
    if node.kind == "global" and node.fx_node.target is moments:
        running = node.fx_node.kwargs.get("running")
        return running if isinstance(running, Running) else None
    return None


def _input_shape(node: Any, values: dict[str, Any]) -> tuple[int, ...]:
    """The shape of a global ``moments`` node's input (a global map)."""
    first = node.fx_node.args[0]
    return tuple(values[first.name].shape)


def _moments_count(node: Any, shape: tuple[int, ...]) -> int:
    kwargs = node.fx_node.kwargs
    groups = int(kwargs.get("groups", 0))
    dims = stat_dims(str(kwargs["kind"]), len(shape))
    layer = Reduction("moments", dims, groups=groups)
    return layer.count(shape)


class _StreamFunction(torch.autograd.Function):
    """Every tile pass of a plan, forward and backward (Rules S1-S2, S10-S13)."""

    @staticmethod
    def forward(
        ctx: Any,
        call: _Call,
        feed: TileFeed,
        x: torch.Tensor | ImageSource,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        plan, graph = call.plan, call.graph
        _keep_for_backward(ctx, call, feed, x)
        stats = _Statistics(graph)
        stitched: dict[int, torch.Tensor] = {}
        with (
            torch.no_grad(),
            host_memory_scope(
                call.host_memory, device=feed.device, largest_bytes=plan.largest_buffer_bytes
            ),
        ):  # S1, FD2
            if plan.passes:
                run_once(graph)  # graph Rule G15
            for tile_pass in plan.tile_passes:
                schedules = tile_pass.schedules
                if call.tiles is not None:  # Rule S9
                    schedules = tuple(schedules[i] for i in call.tiles)
                stats.start(tile_pass)
                taps = stats.taps(tile_pass)
                pass_graph = tile_pass.graph
                assert pass_graph is not None
                image, source_feed, _ = _source_of(ctx, call, tile_pass, x, feed, backward=False)
                layout = pass_graph.source_node.layout
                indices = [_slices(s.input_box, layout, image.dim()) for s in schedules]
                arrivals = source_feed.arrivals(image, indices)
                writes: HostWrites | None = None  # into the kept map (kept Rule KM8)
                for schedule, arrived in zip(schedules, arrivals, strict=True):
                    results = call.run_tile(
                        tile_pass, schedule, source_feed.prepare(arrived), globals=stats.values
                    )
                    owned = _owned(schedule)
                    if tile_pass.level:  # Rule S11: accumulate the owned boxes
                        for r, j in taps:
                            result, box = results[j], owned[j]
                            if result is not None and box is not None:
                                stats.accumulators[r].add(result, box)
                        continue
                    if tile_pass.kept is not None:  # kept Rule KM2: stitched into the kept map
                        assert call.kept is not None and results[0] is not None
                        node = graph.nodes[tile_pass.kept]
                        if writes is None:
                            kept = call.kept.writable(
                                tile_pass.kept, results[0], node.shape, node.path
                            )
                            writes = HostWrites(kept, add=False)
                        writes.put(_slices(owned[0], node.layout, len(node.shape)), results[0])
                        continue
                    outputs = pass_graph.outputs or (pass_graph.output,)
                    for o, result, box in zip(outputs, results, owned, strict=True):
                        if result is None or box is None:
                            continue
                        node = graph.nodes[o]
                        if o not in stitched:
                            stitched[o] = laid_out_like(result, node.shape)
                            if call.tiles is not None:
                                stitched[o].zero_()  # skipped tiles own zeros (masks Rule T2)
                        stitched[o][_slices(box, node.layout, stitched[o].dim())] = result
                if tile_pass.level:
                    stats.finish(tile_pass, _compute_dtype_of(ctx, feed, plan))
                if tile_pass.kept is not None:
                    assert call.kept is not None and writes is not None
                    writes.flush()
                    call.kept.finish(tile_pass.kept)
        if call.kept is not None and not any(ctx.needs_input_grad):
            call.kept.release()  # no backward will read them (kept Rule KM6)
        call.versions.update(tensor_versions(graph.root))  # Rule S13
        ctx.stats = stats
        ctx.schedules = (
            plan.tile_passes[-1].schedules
            if call.tiles is None
            else tuple(plan.tile_passes[-1].schedules[i] for i in call.tiles)
        )
        returned: list[torch.Tensor] = []
        for o in graph.outputs or (graph.output,):
            node = graph.nodes[o]
            if node.spatial:
                if o not in stitched:  # every tile masked out
                    dtype = _compute_dtype_of(ctx, feed, plan)
                    stitched[o] = torch.zeros(node.shape, dtype=dtype, device=feed.device)
                returned.append(stitched[o])
            else:
                returned.append(stats.values[node.name].clone())
        return tuple(returned)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call, x, want_input, grad_x = _backward_start(ctx)
        with host_memory_scope(
            call.host_memory, device=ctx.feed.device, largest_bytes=call.plan.largest_buffer_bytes
        ):  # Rule FD2
            return _StreamFunction._backward(ctx, call, x, want_input, grad_x, grad_outputs)

    @staticmethod
    def _backward(
        ctx: Any,
        call: _Call,
        x: Any,
        want_input: bool,
        grad_x: torch.Tensor | None,
        grad_outputs: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor | None, ...]:
        plan, graph, stats = call.plan, call.graph, ctx.stats
        run = _BackwardRun(ctx, call, x, want_input, grad_x)
        nodes = graph.nodes
        # Rule S12: the global subgraph once, differentiable in every reduction's total
        leaves: dict[int, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with (
            torch.enable_grad(),
            torch.autocast(device_type, autocast_dtype, enabled=autocast_on),  # Rule S6
        ):
            dtype = _compute_dtype_of(ctx, ctx.feed, plan)
            for r, acc in stats.accumulators.items():
                leaves[r] = acc.result().detach().requires_grad_()
                live[nodes[r].name] = stats.value(r, leaves[r], dtype)
            run_globals(graph, live)
        outputs = graph.outputs or (graph.output,)
        spatial_grads: dict[int, torch.Tensor] = {}
        for o, grad in zip(outputs, grad_outputs, strict=True):
            if nodes[o].spatial:
                spatial_grads[o] = grad
            elif grad is not None:
                run.add_upstream(nodes[o].name, grad)
        for tile_pass in reversed(plan.tile_passes):  # kept Rule KM4: reverse order
            if tile_pass.kept is not None:  # the gradient of a kept map, back to its source
                assert call.kept is not None
                kept = {tile_pass.kept: call.kept.gradient(tile_pass.kept)}
                run.output_pass(tile_pass, kept, tile_pass.schedules)
            elif tile_pass.level:
                wanted = [leaves[r] for r in tile_pass.reductions]
                grads = run.pull(live, wanted)  # dL/dP of this level (reductions Rule R3)
                run.statistic_pass(tile_pass, dict(zip(tile_pass.reductions, grads, strict=True)))
            else:  # B0: the output pass
                run.output_pass(tile_pass, spatial_grads, ctx.schedules)
        run.pull_parameters(live)
        if call.kept is not None:
            call.kept.release()  # kept Rule KM6
        if isinstance(x, ImageSource):
            x.release()  # sources Rule I7
        return (None, None, grad_x, *run.grad_params)


class _BackwardRun:
    """One backward: the gradients it sums over tiles and passes (Rules S2, S12)."""

    def __init__(
        self, ctx: Any, call: _Call, x: Any, want_input: bool, grad_x: torch.Tensor | None
    ) -> None:
        self.ctx, self.call, self.x, self.want_input, self.grad_x = ctx, call, x, want_input, grad_x
        self.grad_params: list[torch.Tensor | None] = [None] * len(call.params)
        self.upstream: dict[str, torch.Tensor] = {}  # dL/d(global value), float64

    def add_upstream(self, name: str, grad: torch.Tensor) -> None:
        grad = grad.double()
        previous = self.upstream.get(name)
        self.upstream[name] = grad if previous is None else previous + grad

    def _sinks(
        self, live: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        names = [n for n in self.upstream if live[n].requires_grad]
        return [live[n] for n in names], [self.upstream[n].to(live[n].dtype) for n in names]

    def pull(self, live: dict[str, torch.Tensor], wanted: list[torch.Tensor]) -> list[Any]:
        """dL/d``wanted`` through the global subgraph, from the upstream gradients so far."""
        values, grads = self._sinks(live)
        if not values:
            return [None] * len(wanted)
        return list(
            torch.autograd.grad(values, wanted, grads, retain_graph=True, allow_unused=True)
        )

    def pull_parameters(self, live: dict[str, torch.Tensor]) -> None:
        """The global subgraph's parameter gradients (an SE MLP's, a classifier head's)."""
        params = self.call.params
        values, grads = self._sinks(live)
        if not values or not params:
            return
        found = torch.autograd.grad(values, params, grads, allow_unused=True)
        _add_into(self.grad_params, found)

    def output_pass(
        self,
        tile_pass: StreamPlan,
        grads: dict[int, torch.Tensor],
        schedules: Sequence[Schedule],
    ) -> None:
        """B0 (Rule S2): every tile whose slice of an output gradient is not all zeros; also a
        kept map's pass, with the kept map's gradient (kept Rule KM4)."""
        graph = tile_pass.graph
        assert graph is not None
        outputs = graph.outputs or (graph.output,)
        nodes = graph.nodes
        slices = [
            [
                None if box is None else _slices(box, nodes[o].layout, grads[o].dim())
                for o, box in zip(outputs, _owned(s), strict=True)
            ]
            for s in schedules
        ]
        flat = [
            (grads[o], index)
            for row in slices
            for o, index in zip(outputs, row, strict=True)
            if index
        ]
        flags = iter(_nonzero_slices_of(flat))  # Rule S9, one sync
        keep = [any([next(flags) for index in row if index]) for row in slices]
        last = nodes[graph.output]
        skip_last = (
            len(outputs) == 1
            and last.kind == "window"
            and isinstance(last.layer, Window)
            and last.layer.kind == "conv"
        )

        work = [(s, row) for s, row, k in zip(schedules, slices, keep, strict=True) if k]
        device = self.ctx.feed.device
        arriving = {}  # kept Rule KM8: a kept map's gradient, on the host: slices arrive ahead
        if tile_pass.kept is not None:
            (o,) = outputs
            indices = [r[0] for _, r in work if r[0] is not None]
            arriving[o] = TileFeed(device).arrivals(grads[o], indices)

        def seed(
            schedule: Schedule, tile: torch.Tensor, bound: dict[str, torch.Tensor], row: Any
        ) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
            _, autocast_on, autocast_dtype = self.ctx.autocast
            arrived = {o: next(tiles) for o, tiles in arriving.items()}

            def grad_of(o: int, index: Any) -> torch.Tensor:
                return arrived[o] if o in arrived else grads[o][index]

            if skip_last:  # Rule S4
                padded = self.call.run_tile(
                    tile_pass, schedule, tile, stop_at_output_input=True, globals=bound
                )[0]
                assert padded is not None
                dtype = autocast_dtype if autocast_on else padded.dtype
                grad_tile = grad_of(outputs[0], row[0]).to(padded.device)
                return _conv_backward(last.module, last.layer, padded, grad_tile, dtype)
            results = self.call.run_tile(tile_pass, schedule, tile, globals=bound)
            targets, wanted = [], []
            for o, result, index in zip(outputs, results, row, strict=True):
                if result is not None and index is not None and result.requires_grad:
                    targets.append(result)
                    wanted.append(grad_of(o, index).to(result.device, result.dtype))
            return {}, targets, wanted

        self._tiles(tile_pass, work, seed)

    def statistic_pass(self, tile_pass: StreamPlan, grads: dict[int, Any]) -> None:
        """B_j (Rule S12): the statistics' gradients pushed back through the tiles that fed them
        (a dense field: no tile is skipped)."""
        stats: _Statistics = self.ctx.stats
        taps = [(r, j) for r, j in stats.taps(tile_pass) if grads[r] is not None]
        if not taps:
            return

        def seed(
            schedule: Schedule, tile: torch.Tensor, bound: dict[str, torch.Tensor], row: Any
        ) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
            results = self.call.run_tile(tile_pass, schedule, tile, globals=bound)
            owned = _owned(schedule)
            targets, wanted = [], []
            for r, j in taps:
                crop, box = results[j], owned[j]
                if crop is None or box is None or not crop.requires_grad:
                    continue
                acc = stats.accumulators[r]
                total = acc.result()
                layer = acc.reduction
                targets.append(layer.target(crop, total, stats.count(r), acc.mask(crop, box)))
                wanted.append(grads[r])
            return {}, targets, wanted

        self._tiles(tile_pass, [(s, None) for s in tile_pass.schedules], seed)

    def _tiles(self, tile_pass: StreamPlan, work: list[tuple[Schedule, Any]], seed: Any) -> None:
        """Recompute each tile with grad, seed its targets, backpropagate (Rule S2)."""
        call, ctx = self.call, self.ctx
        x, feed, kept_grad = _source_of(ctx, call, tile_pass, self.x, ctx.feed, backward=True)
        sink = call.sink if kept_grad is None else None
        grad_x = self.grad_x if kept_grad is None else kept_grad  # kept Rule KM4
        want_input = self.want_input or kept_grad is not None
        graph = tile_pass.graph
        assert graph is not None
        layout = graph.source_node.layout
        indices = [_slices(s.input_box, layout, x.dim()) for s, _ in work]
        arrivals = feed.arrivals(x.detach() if isinstance(x, torch.Tensor) else x, indices)
        bound = ctx.stats.leaves()
        writes = None if grad_x is None else HostWrites(grad_x, add=True)  # feed Rule F7
        for (schedule, row), index, arrived in zip(work, indices, arrivals, strict=True):
            grad_tile_x = self._tile(schedule, row, arrived, seed, bound, feed, want_input)  # S14
            if grad_tile_x is not None and writes is not None:
                writes.put(index, grad_tile_x)
            if grad_tile_x is not None and sink is not None:
                sink.add(schedule.input_box, grad_tile_x)  # saliency Rule A3
            del grad_tile_x, arrived  # Rule S14
        if writes is not None:
            writes.flush()

    def _tile(
        self,
        schedule: Schedule,
        row: Any,
        arrived: torch.Tensor,
        seed: Any,
        bound: dict[str, torch.Tensor],
        feed: TileFeed,
        want_input: bool,
    ) -> torch.Tensor | None:
        """One tile of ``_tiles``: what it recomputes and its gradients are freed on return,
        before the next tile starts (Rule S14)."""
        device_type, autocast_on, autocast_dtype = self.ctx.autocast
        if want_input and not arrived.is_floating_point():  # saliency Rule A4
            arrived = arrived.to(feed.dtype or torch.float32)
        leaf = arrived.detach().requires_grad_(want_input)  # Rule S2; feed Rule F3
        with (
            torch.enable_grad(),
            torch.autocast(device_type, autocast_dtype, enabled=autocast_on),
        ):
            extra, targets, grads = seed(schedule, feed.prepare(leaf), bound, row)
        return self._backpropagate(targets, grads, leaf, extra, bound)

    def _backpropagate(
        self,
        targets: list[torch.Tensor],
        grads: list[torch.Tensor],
        leaf: torch.Tensor,
        extra: dict[int, torch.Tensor],
        bound: dict[str, torch.Tensor],
    ) -> torch.Tensor | None:
        """One tile's backward (Rule S2): parameter gradients (and ``extra`` ones, Rule S4)
        added into ``grad_params``, global values' gradients into ``upstream`` (Rule S12); the
        tile's input gradient returned."""
        params = self.call.params
        inputs = (
            [leaf, *params, *bound.values()] if leaf.requires_grad else [*params, *bound.values()]
        )
        wanted = [t for t in inputs if t.requires_grad]
        found = dict(
            zip(
                map(id, wanted),
                torch.autograd.grad(targets, wanted, grads, allow_unused=True)
                if wanted and any(t.requires_grad for t in targets)
                else [None] * len(wanted),
                strict=True,
            )
        )
        _add_into(self.grad_params, [found.get(id(p)) for p in params])
        _add_into(self.grad_params, [extra.get(id(p)) for p in params])
        for name, value in bound.items():
            g = found.get(id(value))
            if g is not None:
                self.add_upstream(name, g)
        return found.get(id(leaf))


def _source_of(
    ctx: Any, call: _Call, tile_pass: StreamPlan, x: Any, feed: TileFeed, *, backward: bool
) -> tuple[Any, TileFeed, torch.Tensor | None]:
    """What a pass's tiles read (kept Rule KM2): the image through ``feed``, or a kept map through
    a feed without ``tile_transform``; and, in backward, the map's gradient (Rule KM4)."""
    graph = tile_pass.graph
    assert graph is not None
    if not graph.source:
        return x, feed, None
    if call.kept is None:
        raise internal_error("a pass from a cut point without kept maps")
    source, computed = call.kept.read(graph.source)
    if not hasattr(ctx, "map_feeds"):
        ctx.map_feeds = {}
    key = (source.dtype, computed)
    if key not in ctx.map_feeds:  # kept Rule KM7: narrowed back to what tiles computed
        narrow = None if computed == source.dtype else _to_dtype(computed)
        ctx.map_feeds[key] = TileFeed(
            feed.device, transform=narrow, channels_last=feed.channels_last
        )
    grad = call.kept.gradient(graph.source) if backward else None
    return source, ctx.map_feeds[key], grad


def _to_dtype(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(tile: torch.Tensor) -> torch.Tensor:
        return tile.to(dtype)

    return convert


def _add_into(total: list[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            previous = total[i]
            total[i] = g if previous is None else previous + g


def _compute_dtype_of(ctx: Any, feed: TileFeed, plan: StreamPlan) -> torch.dtype:
    """The dtype maps are computed in: autocast's, else the tiles' (Rule S6)."""
    _, autocast_on, autocast_dtype = ctx.autocast
    return autocast_dtype if autocast_on else (feed.dtype or plan.dtype)


def _backward_start(ctx: Any) -> tuple[_Call, Any, bool, torch.Tensor | None]:
    """The call (checked unchanged, Rule K4), the image, whether its gradient is wanted (a tensor's
    or a sink's, Rule S8) and the zeroed input gradient of a tensor image."""
    if torch.is_grad_enabled():
        raise StreamcheckError(
            "streamcheck: double backward (backward or autograd.grad with create_graph=True) "
            "through a Streamed module is not supported: each tile's recomputation is "
            "differentiated on its own and the gradients it returns carry no graph. Fix: "
            "call backward without create_graph, or compute higher-order terms on a module "
            "that is not streamed"
        )
    call: _Call = ctx.call
    call.check_unchanged()
    x = ctx.saved_tensors[0] if ctx.saved_tensors else ctx.source
    want_input = bool(ctx.needs_input_grad[2]) or call.sink is not None
    return call, x, want_input, torch.zeros_like(x) if ctx.needs_input_grad[2] else None


def _keep_for_backward(ctx: Any, call: _Call, feed: TileFeed, x: Any) -> None:
    """What backward needs: the call, the feed, the autocast state (Rule S6) and the image."""
    device_type = feed.device.type
    ctx.call, ctx.feed = call, feed
    ctx.autocast = (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
    if isinstance(x, torch.Tensor):
        ctx.save_for_backward(x)
    else:
        ctx.source = x  # Rule S8: read again in backward


def _nonzero_slices_of(pieces: Sequence[tuple[torch.Tensor, tuple[Any, ...]]]) -> list[bool]:
    """Whether each ``grad[index]`` holds a non-zero, in one sync (Rule S9)."""
    if not pieces:
        return []
    flags = torch.stack([grad[index].ne(0).any() for grad, index in pieces])
    return [bool(f) for f in flags.tolist()]


def _conv_backward(
    module: nn.Module | None,
    layer: Window | Any,
    padded: torch.Tensor,
    grad_tile: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of a trailing conv from its padded input tile, without running the conv (Rule S4).

    ``dtype`` is the dtype the conv computed in (autocast's, under autocast); the gradients are
    cast back to their tensors' dtypes as autograd's cast nodes would.
    """
    assert isinstance(module, nn.modules.conv._ConvNd) and isinstance(layer, Window)
    weight, bias = module.weight, module.bias
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_tile.to(dtype).contiguous(),
        padded.detach().to(dtype),
        weight.detach().to(dtype),
        [bias.shape[0]] if bias is not None else None,
        list(layer.stride),
        [0] * layer.ndim,
        list(layer.dilation),
        False,
        [0] * layer.ndim,
        module.groups,
        [padded.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad],
    )
    extra: dict[int, torch.Tensor] = {}
    if weight.requires_grad:
        extra[id(weight)] = grad_weight.to(weight.dtype)
    if bias is not None and bias.requires_grad:
        extra[id(bias)] = grad_bias.to(bias.dtype)
    if padded.requires_grad:
        return extra, [padded], [grad_input.to(padded.dtype)]
    return extra, [], []
