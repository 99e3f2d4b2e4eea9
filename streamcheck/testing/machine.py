"""A stateful proof: hypothesis changes a wrapped module the way users do, and checks every step.

``streaming_machine`` returns a hypothesis ``RuleBasedStateMachine`` for your own model. It wraps
the model once in ``streamcheck.Streamed`` and then, in any order hypothesis finds, does what users
do between calls: model surgery, loading weights, changing the tile, train/eval, freezing, a dtype
round trip, channels-last, optimizer steps, saving and reloading. After every step the wrapper --
the same object, with whatever it cached -- must still compute what the model computes.

NOTE [ Stateful proof ]
Rule M1. State is the model (float64), its one ``Streamed`` wrapper (replaced only by its own
         reloaded copy) and the input shape; every expectation is derived from the model as it is
         at that moment, never from what the wrapper saw before.
Rule M2. The rules (M2a-M2k) are what users do: (a) swap a leaf for a legal other one (a fresh
         conv, a conv with a larger kernel -- padding grown with it, so sizes stay -- another
         activation, a fresh norm, max <-> average pooling); (b) a new stem conv for images with
         other channels (nn.Sequential models); (c) load a state dict with other values, through
         the model or the wrapper; (d) change one parameter or buffer in place, through ``.data``
         or as a new object; (e) set ``Streamed.tile``; (f) ``train()``/``eval()`` on a part;
         (g) freeze or unfreeze parameters; (h) run in float32 and come back to float64;
         (i) toggle ``Streamed.channels_last`` or the model's memory format; (j) optimizer steps
         through the wrapper; (k) save and reload with ``torch.save``/``torch.load``, pickle or
         deepcopy; and (l) another batch size or image size.
Rule M3. After every rule (a hypothesis invariant) ``checker.check_streamed`` compares the wrapper
         with a deep copy of the model run plainly: output, input gradient, every trainable
         parameter gradient and the buffers, float64 with rtol 1e-10.
Rule M4. Where the model is no longer local -- Dropout with p > 0 or SyncBatchNorm in training
         mode (BatchNorm on batch statistics, GroupNorm and InstanceNorm stream in passes, their
         running statistics compared as buffers by Rule M3) -- or the tile is below the receptive field
         (computed independently of the engine: ``receptive_field``, by default
         ``_geometry.geometry_of``), the wrapper must raise ``StreamcheckError`` instead, and
         leave every buffer as it was; for a tile, the message names the receptive field.
Rule M5. Swaps are legal by construction and confirmed by running the plain model: a swap the
         plain model cannot run (say reflect padding wider than a feature map) is undone.
Rule M6. All randomness is drawn (seeds for new weights and values), so hypothesis replays and
         shrinks a failing sequence of steps exactly.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import streamcheck
from streamcheck.testing._geometry import geometry_of
from streamcheck.testing.checker import check_streamed
from streamcheck.testing.strategies import (
    _AVG_POOL,
    _CONV,
    _MAX_POOL,
    ACTIVATIONS,
    _random_statistics,
)

__all__ = ["RULES", "StreamingMachine", "streaming_machine"]

#: The rules of Rule M2, by name (``streaming_machine(rules=...)`` picks some).
RULES = (
    "swap_submodule",
    "new_stem",
    "load_state_dict",
    "change_in_place",
    "set_tile",
    "set_mode",
    "freeze",
    "float32_round_trip",
    "channels_last",
    "optimizer_step",
    "save_and_reload",
    "new_image_shape",
)

_ELEMENTWISE = tuple(type(factory()) for factory in ACTIVATIONS)
_SEEDS = st.integers(0, 2**32 - 1)


def non_local_parts(model: nn.Module) -> list[str]:
    """Paths of the parts that make ``model`` non-local in their current mode (Rule M4): Dropout
    in training mode and SyncBatchNorm in training mode. BatchNorm in either mode, GroupNorm and
    InstanceNorm stream (reductions Rules R1-R5).

    >>> model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1), nn.Dropout(0.5))
    >>> non_local_parts(model), non_local_parts(model.eval())
    (['2'], [])
    """
    found = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.SyncBatchNorm) and m.training) or (
            isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        ):
            found.append(name)
    return found


class StreamingMachine(RuleBasedStateMachine):
    """Rules M2a-M2l on one model and its wrapper; the check of Rule M3 after each.

    Configured by class attributes, which :func:`streaming_machine` sets on a subclass from its
    arguments: ``build_model``, ``input_shape``, ``initial_tile``, ``receptive_field_of`` and
    ``enabled_rules``.
    """

    build_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    initial_tile: int | tuple[int, ...]
    receptive_field_of: Callable[[nn.Module], Sequence[int]] | None = None
    enabled_rules: frozenset[str] = frozenset(RULES)

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = type(self).build_model()
        self.model = model.double()
        self.streamed = streamcheck.Streamed(self.model, tile=self.initial_tile)
        self.ndim = len(self.input_shape) - 2
        self.shape = self.input_shape
        self.seed = 0

    def _field_of(self, model: nn.Module) -> tuple[int, ...]:
        """Rule M4's receptive field, computed without streamcheck."""
        field = type(self).receptive_field_of
        if field is not None:
            return tuple(int(f) for f in field(model))
        return geometry_of(model, ndim=self.ndim).receptive_field_px

    # ------------------------------------------------------------------------ helpers
    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def _plain_runs(self) -> bool:
        """Rule M5: the plain model runs on the input and gives finite numbers."""
        x = torch.randn(self.shape, generator=self._generator(1), dtype=self._dtype())
        try:
            with torch.no_grad():
                return bool(self.model(x).isfinite().all())
        except (RuntimeError, ValueError):
            return False

    def _dtype(self) -> torch.dtype:
        first = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.float64

    def _leaves(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if n and not list(m.children())]

    def _replace(self, path: str, new: nn.Module) -> nn.Module:
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        old = getattr(parent, name)
        setattr(parent, name, new)
        return old

    def _expected_refusal(self) -> str | None:
        """Why the wrapper must refuse now (Rule M4), or None."""
        parts = non_local_parts(self.model)
        if parts:
            return f"non-local in this mode: {parts}"
        fields = self._field_of(self.model)
        tiles = (
            (self.streamed.tile,) * self.ndim
            if isinstance(self.streamed.tile, int)
            else tuple(self.streamed.tile)
        )
        small = [(t, f) for t, f in zip(tiles, fields, strict=True) if t < f]
        if small:
            return f"tile {tiles} below the receptive field {fields}"
        return None

    # ------------------------------------------------------------------- Rule M3 / M4
    @invariant()
    def streamed_equals_plain(self) -> None:
        refusal = self._expected_refusal()
        with warnings.catch_warnings():  # a tile may cover the image: still a valid check
            warnings.filterwarnings("ignore", "streamcheck: tile .* covers the whole")
            if refusal is None:
                report = check_streamed(self.streamed, self.shape, seed=self.seed)
                assert report.passed, f"\n{report}"
                return
            before = [b.detach().clone() for b in self.model.buffers()]
            try:
                check_streamed(self.streamed, self.shape, seed=self.seed)
            except streamcheck.StreamcheckError as error:
                message = str(error)
            else:
                raise AssertionError(f"the wrapper streamed a model it must refuse ({refusal})")
        after = list(self.model.buffers())
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
            "a refused call changed buffers"
        )
        if refusal.startswith("tile"):
            fields = self._field_of(self.model)
            assert any(str(f) in message for f in fields), (
                f"the refusal does not name the receptive field {fields}: {message}"
            )

    # ---------------------------------------------------------------------- the rules
    @rule(data=st.data())
    @precondition(lambda self: "swap_submodule" in self.enabled_rules)
    def swap_submodule(self, data: st.DataObject) -> None:
        """Rule M2a."""
        options = [(p, m) for p, m in self._leaves() if self._swaps_for(m)]
        if not options:
            return
        path, old = data.draw(st.sampled_from(options), label="leaf")
        kind = data.draw(st.sampled_from(self._swaps_for(old)), label="swap")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.draw(_SEEDS, label="seed"))
            new = self._swapped(old, kind, data)
        new.to(dtype=self._dtype()).train(old.training)
        self._replace(path, new)
        if not self._plain_runs():  # Rule M5
            self._replace(path, old)
            note(f"swap {path} ({kind}) undone: the plain model cannot run it")
            return
        note(f"swapped {path}: {old} -> {new}")

    def _swaps_for(self, m: nn.Module) -> list[str]:
        if isinstance(m, nn.modules.conv._ConvNd):
            return ["fresh conv", "larger kernel"]
        if isinstance(m, _ELEMENTWISE):
            return ["activation"]
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return ["fresh norm"]
        if isinstance(m, nn.modules.pooling._AvgPoolNd) or (
            isinstance(m, nn.modules.pooling._MaxPoolNd) and m.dilation in (1, (1,) * self.ndim)
        ):
            return ["other pool"]
        return []

    def _swapped(self, old: Any, kind: str, data: st.DataObject) -> nn.Module:
        if kind == "activation":
            return data.draw(st.sampled_from(ACTIVATIONS), label="activation")()
        if kind == "fresh norm":
            return _random_statistics(type(old)(old.num_features, affine=old.affine))
        if kind == "other pool":
            pool = _AVG_POOL if isinstance(old, nn.modules.pooling._MaxPoolNd) else _MAX_POOL
            return pool[self.ndim](
                old.kernel_size, old.stride, old.padding, ceil_mode=old.ceil_mode
            )
        grow = 2 if kind == "larger kernel" else 0
        kernel = tuple(k + grow for k in old.kernel_size)
        padding: Any = old.padding
        if grow and padding != "same":
            pads = (0,) * self.ndim if padding == "valid" else tuple(padding)
            padding = tuple(p + d for p, d in zip(pads, old.dilation, strict=True))
        return _CONV[self.ndim](
            old.in_channels,
            old.out_channels,
            kernel,
            stride=old.stride,
            padding=padding,
            dilation=old.dilation,
            groups=old.groups,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
        )

    @rule(data=st.data())
    @precondition(lambda self: "new_stem" in self.enabled_rules)
    def new_stem(self, data: st.DataObject) -> None:
        """Rule M2b: a 'same' conv in front, for images with other channels."""
        if not isinstance(self.model, nn.Sequential):
            return
        channels = self.shape[1]
        first = self.model[0] if len(self.model) else None
        replace = getattr(first, "_streamcheck_stem", False)
        out = first.out_channels if replace and first is not None else channels
        new_channels = data.draw(st.integers(1, 4), label="image channels")
        kernel = data.draw(st.sampled_from([1, 3]), label="kernel")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data.draw(_SEEDS, label="seed"))
            stem = _CONV[self.ndim](new_channels, out, kernel, padding="same")
        stem._streamcheck_stem = True
        stem.to(dtype=self._dtype())
        if replace:
            self.model[0] = stem
        else:
            self.model.insert(0, stem)
        self.shape = (self.shape[0], new_channels, *self.shape[2:])
        note(f"new stem {stem} ({'replaced' if replace else 'inserted'})")

    @rule(data=st.data(), through_wrapper=st.booleans())
    @precondition(lambda self: "load_state_dict" in self.enabled_rules)
    def load_state_dict(self, data: st.DataObject, through_wrapper: bool) -> None:
        """Rule M2c."""
        generator = self._generator(data.draw(_SEEDS, label="seed"))
        state = {}
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                value = _new_values(key, value, generator)
            state[key] = value
        (self.streamed if through_wrapper else self.model).load_state_dict(state)

    @rule(data=st.data())
    @precondition(lambda self: "change_in_place" in self.enabled_rules)
    def change_in_place(self, data: st.DataObject) -> None:
        """Rule M2d."""
        tensors = [
            (name, t)
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if t.is_floating_point()
        ]
        if not tensors:
            return
        name, tensor = data.draw(st.sampled_from(tensors), label="tensor")
        how = data.draw(st.sampled_from(["in place", ".data", "new object"]), label="how")
        new = _new_values(name, tensor, self._generator(data.draw(_SEEDS, label="seed")))
        if how == "in place":
            with torch.no_grad():
                tensor.copy_(new)
        elif how == ".data":
            tensor.data = new.to(tensor.dtype)
        else:
            owner_path, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_path) if owner_path else self.model
            if isinstance(tensor, nn.Parameter):
                setattr(owner, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
            else:
                setattr(owner, attr, new)

    @rule(data=st.data())
    @precondition(lambda self: "set_tile" in self.enabled_rules)
    def set_tile(self, data: st.DataObject) -> None:
        """Rule M2e: tiles around and below the receptive field, up to the whole image."""
        fields = self._field_of(self.model)
        edges = [
            data.draw(st.integers(max(1, f - 2), max(f, n) + 2), label=f"tile axis {a}")
            for a, (f, n) in enumerate(zip(fields, self.shape[2:], strict=True))
        ]
        self.streamed.tile = edges[0] if len(set(edges)) == 1 else tuple(edges)

    @rule(data=st.data(), training=st.booleans())
    @precondition(lambda self: "set_mode" in self.enabled_rules)
    def set_mode(self, data: st.DataObject, training: bool) -> None:
        """Rule M2f: train() or eval() on the model or one part of it."""
        paths = [name for name, _ in self.model.named_modules()]
        path = data.draw(st.sampled_from(paths), label="part")
        (self.model.get_submodule(path) if path else self.model).train(training)

    @rule(data=st.data(), requires_grad=st.booleans())
    @precondition(lambda self: "freeze" in self.enabled_rules)
    def freeze(self, data: st.DataObject, requires_grad: bool) -> None:
        """Rule M2g: one parameter, or all of one part."""
        paths = [name for name, _ in self.model.named_modules()]
        paths += [name for name, _ in self.model.named_parameters()]
        path = data.draw(st.sampled_from(paths), label="part or parameter")
        parameters = dict(self.model.named_parameters())
        if path in parameters:
            parameters[path].requires_grad_(requires_grad)
        else:
            (self.model.get_submodule(path) if path else self.model).requires_grad_(requires_grad)

    @rule(seed=_SEEDS)
    @precondition(lambda self: "float32_round_trip" in self.enabled_rules)
    def float32_round_trip(self, seed: int) -> None:
        """Rule M2h: a float32 forward and backward through the wrapper, then float64 again."""
        self.model.float()
        try:
            if self._expected_refusal() is None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "streamcheck: tile .* covers the whole")
                    report = check_streamed(self.streamed, self.shape, seed=seed)
                rows = [row for row in report.rows if row.kind == "output"]
                assert all(row.passed for row in rows), f"float32 output:\n{report}"
        finally:
            self.model.double()

    @rule(data=st.data())
    @precondition(lambda self: "channels_last" in self.enabled_rules)
    def channels_last(self, data: st.DataObject) -> None:
        """Rule M2i: the wrapper's option, or the model's memory format."""
        if self.ndim == 1 or data.draw(st.booleans(), label="wrapper option"):
            self.streamed.channels_last = not self.streamed.channels_last
            return
        layout = torch.channels_last if self.ndim == 2 else torch.channels_last_3d
        fmt = data.draw(st.sampled_from([layout, torch.contiguous_format]), label="format")
        self.model.to(memory_format=fmt)

    @rule(seed=_SEEDS, adam=st.booleans(), steps=st.integers(1, 2))
    @precondition(lambda self: "optimizer_step" in self.enabled_rules)
    def optimizer_step(self, seed: int, adam: bool, steps: int) -> None:
        """Rule M2j: through the wrapper when it may stream, else through the plain model."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return
        optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=1e-2)
            if adam
            else torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        )
        runner = self.streamed if self._expected_refusal() is None else self.model
        generator = self._generator(seed)
        for _ in range(steps):
            x = torch.randn(self.shape, generator=generator, dtype=self._dtype())
            y = runner(x)
            g = torch.randn(y.shape, generator=generator, dtype=y.dtype)
            optimizer.zero_grad(set_to_none=True)
            (y * g).mean().backward()
            nn.utils.clip_grad_norm_(params, 1.0)  # long sequences must not diverge
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @rule(how=st.sampled_from(["torch.save", "pickle", "deepcopy"]))
    @precondition(lambda self: "save_and_reload" in self.enabled_rules)
    def save_and_reload(self, how: str) -> None:
        """Rule M2k: the wrapper after it has run, as torch.save, multiprocessing or
        Lightning's ddp_spawn move it."""
        if how == "torch.save":
            buffer = io.BytesIO()
            torch.save(self.streamed, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        elif how == "pickle":
            loaded = pickle.loads(pickle.dumps(self.streamed))
        else:
            loaded = copy.deepcopy(self.streamed)
        assert isinstance(loaded, streamcheck.Streamed)
        self.streamed, self.model = loaded, loaded.module

    @rule(data=st.data())
    @precondition(lambda self: "new_image_shape" in self.enabled_rules)
    def new_image_shape(self, data: st.DataObject) -> None:
        """Rule M2l: another batch size; another image size where the geometry is known."""
        batch = data.draw(st.integers(1, 3), label="batch")
        spatial = list(self.shape[2:])
        if type(self).receptive_field_of is None:
            smallest = geometry_of(self.model, ndim=self.ndim).min_input_px
            spatial = [
                data.draw(st.integers(lo, max(lo, math.ceil(n * 1.5))), label="size")
                for lo, n in zip(smallest, self.input_shape[2:], strict=True)
            ]
        previous = self.shape
        self.shape = (batch, self.shape[1], *spatial)
        if not self._plain_runs():  # Rule M5
            self.shape = previous


def streaming_machine(
    build: Callable[[], nn.Module],
    *,
    input_shape: Sequence[int],
    tile: int | Sequence[int],
    receptive_field: Callable[[nn.Module], Sequence[int]] | None = None,
    rules: Collection[str] = RULES,
) -> type[RuleBasedStateMachine]:
    """A ``RuleBasedStateMachine`` that changes ``build()``'s model between streamed calls.

    ``build`` makes the model (called under ``torch.manual_seed(0)`` for every example, so make it
    deterministic); the machine casts it to float64 and wraps it as
    ``Streamed(model, tile=tile)``. ``input_shape`` is ``(N, C, *spatial)``. ``receptive_field``
    returns the model's receptive field per spatial axis, computed *without* streamcheck (Rule M4);
    the default, ``_geometry.geometry_of``, knows nn.Sequential stacks of torch's conv, pool
    and pointwise layers and the blocks of ``streamcheck.testing.graphs`` (it counts unknown
    leaves as pointwise: pass your own function for other models). ``rules`` picks among
    ``RULES`` (say, without ``"save_and_reload"`` for a model that does not pickle). Use the
    returned class's
    ``TestCase`` in a test module, or run it with ``run_state_machine_as_test``.

    >>> from hypothesis import settings
    >>> from hypothesis.stateful import run_state_machine_as_test
    >>> def trunk():  # 24 px -> 12 px; receptive field 3 + (3 - 1) * 2 = 8 px
    ...     return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4).eval())
    >>> Machine = streaming_machine(trunk, input_shape=(1, 3, 24, 24), tile=12)
    >>> run_state_machine_as_test(Machine, settings=settings(
    ...     max_examples=2, stateful_step_count=3, deadline=None, database=None))
    """
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise streamcheck.StreamcheckError(
            f"streamcheck: unknown rules {unknown}; the machine's rules are {list(RULES)}"
        )
    name = f"StreamingMachine_{getattr(build, '__name__', 'model')}"
    config = {
        "build_model": staticmethod(build),
        "input_shape": tuple(int(s) for s in input_shape),
        "initial_tile": tile if isinstance(tile, int) else tuple(tile),
        "receptive_field_of": None if receptive_field is None else staticmethod(receptive_field),
        "enabled_rules": frozenset(rules),
        "__qualname__": name,
    }
    return type(name, (StreamingMachine,), config)


def _new_values(name: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random values for a tensor named ``name``: variances stay positive."""
    values = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    if name.endswith("running_var"):
        values = 0.5 + values.abs()
    return values.to(dtype=like.dtype, device=like.device)
