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
         run recomputes exactly what its forward computed.
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compiled import CompileRecord, TilePrograms
from .defaults import keep_host_memory_for
from .errors import StreamcheckError, internal_error
from .feed import TileFeed, laid_out_like
from .graph import Graph, build_graph, unflatten
from .layers import Window
from .masks import ScaledMask
from .plan import StreamPlan, make_plan, normalize_tile
from .program import Schedule, run_tile
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
    tile buffers are kept for reuse (a process-wide glibc setting, ``keep_freed_host_memory``)
    unless ``keep_host_memory=False`` (NOTE [ Fast defaults ]); results are unchanged.

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
    ) -> None:
        super().__init__()
        self.module = module
        self.tile = tile
        self.tile_transform = tile_transform
        self.channels_last = channels_last  # Rule FD1
        self.keep_host_memory = keep_host_memory  # Rule FD2
        self._programs = TilePrograms() if compile else None  # Rules C1-C4
        self._plans: PlanCache[StreamPlan] = PlanCache()
        self._register_state_dict_hook(_hide_module_prefix)
        self._register_load_state_dict_pre_hook(_restore_module_prefix)

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

        def build() -> StreamPlan:
            graph = build_graph(self.module, shape, dtype=dtype)
            return make_plan(graph, normalize_tile(self.tile, len(shape) - 2))

        return self._plans.get(state, (shape, dtype, tile, device), build)

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
        keep_host_memory_for(self.keep_host_memory, device=device)  # Rule FD2
        feed = TileFeed(
            device,
            transform=self.tile_transform,
            channels_last=self.channels_last,  # Rule FD1
            dtype=None if autocast else dtype,
        )
        versions = tensor_versions(self.module)
        call = _Call(plan, state, versions, params, tiles, sink, self._programs)
        graph = plan.graph
        assert graph is not None
        if graph.multiscale:  # Rule S10
            if mask is not None:
                raise StreamcheckError(
                    "streamcheck: mask= is not supported for modules that upsample or return "
                    "several outputs. Fix: stream without a mask"
                )
            outputs = _MultiStreamFunction.apply(call, feed, x, *params)
            if graph.spec is None:
                return outputs[0]
            return unflatten(graph.spec, outputs)
        output: torch.Tensor = _StreamFunction.apply(call, feed, x, *params)
        return output

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
        graph = plan.graph
        assert graph is not None
        if graph.multiscale:
            raise StreamcheckError(
                "streamcheck: computed_region is for modules with one output that do not upsample"
            )
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


def _masked_tiles(plan: StreamPlan, mask: Any) -> tuple[int, ...]:
    """The tiles whose input box touches the mask (masks Rule T2)."""
    scaled = ScaledMask(mask, plan.input_shape[2:])
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
    versions: dict[str, int]
    params: tuple[torch.Tensor, ...]
    tiles: tuple[int, ...] | None = None  # those computed (masks Rule T2); None: all
    sink: GradientSink | None = None  # where a source's input gradient goes (Rule S8)
    programs: TilePrograms | None = None  # compile=True (NOTE [ Compiled tile programs ])

    @property
    def graph(self) -> Graph:
        graph = self.plan.graph
        if graph is None:
            raise internal_error("a plan without its graph")
        return graph

    def run_tile(self, schedule: Schedule, x: torch.Tensor, **options: Any) -> Any:
        """One tile's program: compiled per schedule class (Rule C1), or run eagerly."""
        graph = self.plan.graph
        assert graph is not None
        if self.programs is None:
            return run_tile(graph, schedule, x, **options)
        return self.programs.run(graph, self.plan.schedules, schedule, x, **options)

    def check_unchanged(self) -> None:
        """The module the recomputation will run is the one forward ran (Rule K4)."""
        graph = self.plan.graph
        assert graph is not None
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


class _StreamFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        call: _Call,
        feed: TileFeed,
        x: torch.Tensor | ImageSource,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        plan = call.plan
        graph = plan.graph
        assert graph is not None
        _keep_for_backward(ctx, call, feed, x)
        schedules = plan.schedules
        if call.tiles is not None:  # Rule S9
            schedules = tuple(schedules[i] for i in call.tiles)
        indices = [_slices(s.input_box, graph.nodes[0].layout, x.dim()) for s in schedules]
        ctx.schedules, ctx.indices = schedules, indices
        out_layout = graph.output_node.layout
        output: torch.Tensor | None = None
        with torch.no_grad():  # Rule S1
            for schedule, arrived in zip(schedules, feed.arrivals(x, indices), strict=True):
                result = call.run_tile(schedule, feed.prepare(arrived))
                if output is None:
                    output = laid_out_like(result, graph.output_node.shape)
                    if call.tiles is not None:
                        output.zero_()  # skipped tiles own zeros (masks Rule T2)
                output[_slices(schedule.output_box, out_layout, output.dim())] = result
        if output is None:  # every tile masked out
            autocast_on, autocast_dtype = ctx.autocast[1:]
            dtype = autocast_dtype if autocast_on else (feed.dtype or plan.dtype)
            output = torch.zeros(graph.output_node.shape, dtype=dtype, device=feed.device)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call, x, want_input, grad_x = _backward_start(ctx)
        graph, params, feed, sink = call.graph, call.params, ctx.feed, call.sink
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        out_layout = graph.output_node.layout
        slices = [_slices(s.output_box, out_layout, grad_output.dim()) for s in ctx.schedules]
        nonzero = _nonzero_slices(grad_output, slices)  # Rule S9
        work = [
            (schedule, index, grad_slice)
            for schedule, index, grad_slice, keep in zip(
                ctx.schedules, ctx.indices, slices, nonzero, strict=True
            )
            if keep
        ]
        arrivals = feed.arrivals(
            x.detach() if isinstance(x, torch.Tensor) else x, [index for _, index, _ in work]
        )
        last = graph.output_node
        skip_last = (
            last.kind == "window" and isinstance(last.layer, Window) and last.layer.kind == "conv"
        )
        device_type, autocast_on, autocast_dtype = ctx.autocast
        for (schedule, index, grad_slice), arrived in zip(work, arrivals, strict=True):
            if want_input and not arrived.is_floating_point():  # saliency Rule A4
                arrived = arrived.to(feed.dtype or torch.float32)
            leaf = arrived.detach().requires_grad_(want_input)  # Rule S2; feed Rule F3
            grad_tile = grad_output[grad_slice]
            with (
                torch.enable_grad(),
                torch.autocast(device_type, autocast_dtype, enabled=autocast_on),
            ):
                tile = feed.prepare(leaf)
                if skip_last:  # Rule S4
                    padded = call.run_tile(schedule, tile, stop_at_output_input=True)
                    dtype = autocast_dtype if autocast_on else padded.dtype
                    extra, targets, grads = _conv_backward(
                        last.module, last.layer, padded, grad_tile, dtype
                    )
                else:
                    result = call.run_tile(schedule, tile)
                    extra, targets, grads = {}, [result], [grad_tile]
            grad_tile_x = _backpropagate(targets, grads, leaf, params, grad_params, extra)
            if grad_tile_x is not None and grad_x is not None:
                grad_x[index] += grad_tile_x.to(grad_x.device)
            if grad_tile_x is not None and sink is not None:
                sink.add(schedule.input_box, grad_tile_x)  # saliency Rule A3
        return (None, None, grad_x, *grad_params)


class _MultiStreamFunction(torch.autograd.Function):
    """Rule S10: several outputs, or layers that upsample (run_tile returns one crop per output)."""

    @staticmethod
    def forward(
        ctx: Any,
        call: _Call,
        feed: TileFeed,
        x: torch.Tensor | ImageSource,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        plan = call.plan
        graph = plan.graph
        assert graph is not None
        _keep_for_backward(ctx, call, feed, x)
        indices = [_slices(s.input_box, graph.nodes[0].layout, x.dim()) for s in plan.schedules]
        ctx.indices = indices
        nodes = [graph.nodes[o] for o in graph.outputs]
        outputs: list[torch.Tensor | None] = [None] * len(nodes)
        with torch.no_grad():  # Rule S1
            for schedule, arrived in zip(plan.schedules, feed.arrivals(x, indices), strict=True):
                results = call.run_tile(schedule, feed.prepare(arrived))
                if graph.spec is None:
                    results = (results,)
                for j, (result, box) in enumerate(zip(results, schedule.output_boxes, strict=True)):
                    if result is None or box is None:
                        continue
                    if outputs[j] is None:
                        outputs[j] = laid_out_like(result, nodes[j].shape)
                    target = outputs[j]
                    assert target is not None
                    target[_slices(box, nodes[j].layout, target.dim())] = result
        if any(o is None for o in outputs):
            raise internal_error("an output that no tile owns")
        return tuple(o for o in outputs if o is not None)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call, x, want_input, grad_x = _backward_start(ctx)
        plan, graph, params, feed, sink = call.plan, call.graph, call.params, ctx.feed, call.sink
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        layouts = [graph.nodes[o].layout for o in graph.outputs]
        slices = [
            [
                None if box is None else _slices(box, layout, grad.dim())
                for box, layout, grad in zip(s.output_boxes, layouts, grad_outputs, strict=True)
            ]
            for s in plan.schedules
        ]
        flat = [
            (g, index)
            for row in slices
            for g, index in zip(grad_outputs, row, strict=True)
            if index
        ]
        flags = iter(_nonzero_slices_of(flat))  # Rule S9, one sync
        nonzero = [any([next(flags) for index in row if index]) for row in slices]
        work = [
            (schedule, index, row)
            for schedule, index, row, keep in zip(
                plan.schedules, ctx.indices, slices, nonzero, strict=True
            )
            if keep
        ]
        arrivals = feed.arrivals(
            x.detach() if isinstance(x, torch.Tensor) else x, [index for _, index, _ in work]
        )
        device_type, autocast_on, autocast_dtype = ctx.autocast
        for (schedule, index, row), arrived in zip(work, arrivals, strict=True):
            if want_input and not arrived.is_floating_point():  # saliency Rule A4
                arrived = arrived.to(feed.dtype or torch.float32)
            leaf = arrived.detach().requires_grad_(want_input)
            with (
                torch.enable_grad(),
                torch.autocast(device_type, autocast_dtype, enabled=autocast_on),
            ):
                results = call.run_tile(schedule, feed.prepare(leaf))
            if graph.spec is None:
                results = (results,)
            targets, grads = [], []
            for result, grad, piece in zip(results, grad_outputs, row, strict=True):
                if result is not None and piece is not None and result.requires_grad:
                    targets.append(result)
                    grads.append(grad[piece])
            grad_tile_x = _backpropagate(targets, grads, leaf, params, grad_params, {})
            if grad_tile_x is not None and grad_x is not None:
                grad_x[index] += grad_tile_x.to(grad_x.device)
            if grad_tile_x is not None and sink is not None:
                sink.add(schedule.input_box, grad_tile_x)  # saliency Rule A3
        return (None, None, grad_x, *grad_params)


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


def _backpropagate(
    targets: list[torch.Tensor],
    grads: list[torch.Tensor],
    leaf: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    grad_params: list[torch.Tensor | None],
    extra: dict[int, torch.Tensor],
) -> torch.Tensor | None:
    """One tile's backward (Rule S2): parameter gradients (and ``extra`` ones, Rule S4) added
    into ``grad_params``; the tile's input gradient returned."""
    inputs = [leaf, *params] if leaf.requires_grad else list(params)
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
    for i, p in enumerate(params):
        for g in (found.get(id(p)), extra.get(id(p))):
            if g is not None:
                previous = grad_params[i]
                grad_params[i] = g if previous is None else previous + g
    return found.get(id(leaf))


def _nonzero_slices_of(pieces: Sequence[tuple[torch.Tensor, tuple[Any, ...]]]) -> list[bool]:
    """Whether each ``grad[index]`` holds a non-zero, in one sync (Rule S9)."""
    if not pieces:
        return []
    flags = torch.stack([grad[index].ne(0).any() for grad, index in pieces])
    return [bool(f) for f in flags.tolist()]


def _nonzero_slices(grad: torch.Tensor, slices: Sequence[tuple[Any, ...]]) -> list[bool]:
    """Whether each slice of ``grad`` holds a non-zero (NaN and inf count), in one sync (Rule S9)."""
    if not slices:
        return []
    flags = torch.stack([grad[index].ne(0).any() for index in slices])
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
