"""What a cached plan depends on: the module's state, as a key compared on every call.

NOTE [ Plan cache ]
Rule K1. A plan (the traced graph, its locality verdict, shapes and tile schedules) is cached per
         *module state* and per call settings. The module state is `module_state`: for every
         submodule its path, identity, class and ``forward``, training flag, hooks and plain
         attributes (kernel sizes, strides, paddings, eps, ``inplace``, ...), and for every
         parameter and buffer its path, identity, shape, dtype and device.
         The call settings are the input shape, the dtype the module computes in, the requested
         tile and the module's device.
Rule K2. Values are not in the key: parameters, buffers and other tensors are read from the live
         module on every tile (graph Rule G4), so an optimizer step, ``load_state_dict`` or an in-
         place edit needs no new plan. Anything that replaces an object, changes a shape or a
         flag changes the key, and the plan is derived again, with its locality checks.
Rule K3. When the module state changes, every cached plan is dropped (they would hold replaced
         submodules and their memory); at most ``MAX_PLANS`` input shapes are kept per state.
Rule K4. The state at forward is kept for backward, which refuses to recompute from a module
         that changed in between, and so do parameters and buffers written in place in between
         (tensor version counters): the recomputation would not be what forward computed.
Rule K5. Plans are not pickled: ``torch.save``, deep copies and ``torch.multiprocessing`` carry the
         module, and the copy derives its plans again on first use.
What the key cannot see: Python state outside the module that ``forward`` reads (globals,
closures, monkeypatched functions). Change those only before wrapping.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["MAX_PLANS", "PlanCache", "module_state", "tensor_versions"]

MAX_PLANS = 8

_STRUCTURE = frozenset({"_parameters", "_buffers", "_modules", "training"})
_PLAIN = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device})

Plan = TypeVar("Plan")


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for an attribute: the value when it is plain, else the object's identity."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is tuple or kind is list:
        return (kind.__name__, *(_freeze(v) for v in value))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):  # hook and other registries: their keys and entries' identities
        return ("dict", *((_freeze(k), id(v)) for k, v in value.items())) if value else "{}"
    return ("object", id(value))


def _tensor(t: torch.Tensor | None) -> Hashable:
    if t is None:
        return None
    return (id(t), tuple(t.shape), t.dtype, t.device)


def module_state(module: nn.Module) -> tuple[Hashable, ...]:
    """The key of Rule K1 for ``module`` and everything under it.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> key = module_state(net)
    >>> net[0].weight.data.mul_(2) is not None and module_state(net) == key  # values: same key
    True
    >>> net[1] = nn.Sigmoid(); module_state(net) == key                      # new module: new key
    False
    """
    rows: list[Hashable] = []
    for path, m in module.named_modules(remove_duplicate=False):
        attributes = tuple(
            (name, _freeze(value)) for name, value in vars(m).items() if name not in _STRUCTURE
        )
        rows.append((path, id(m), type(m), type(m).forward, m.training, attributes))
        rows.extend((path, name, _tensor(p)) for name, p in m._parameters.items())
        rows.extend((path, name, _tensor(b)) for name, b in m._buffers.items())
    return tuple(rows)


def tensor_versions(module: nn.Module) -> dict[str, int]:
    """The version counter of every parameter and buffer, by path (Rule K4)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: t._version for name, t in tensors}


class PlanCache(Generic[Plan]):
    """Plans for one module state, at most ``MAX_PLANS`` of them, least recently used out (Rule K3).

    >>> cache: PlanCache[str] = PlanCache()
    >>> cache.get(("state", 1), "shape A", lambda: "plan A")
    'plan A'
    >>> cache.get(("state", 1), "shape A", lambda: "never built")   # same state and settings
    'plan A'
    >>> cache.get(("state", 2), "shape A", lambda: "plan A'")       # the module changed
    "plan A'"
    """

    def __init__(self) -> None:
        self.state: Hashable = None
        self.plans: OrderedDict[Hashable, Plan] = OrderedDict()

    def get(self, state: Hashable, settings: Hashable, build: Any) -> Plan:
        if state != self.state:
            self.state, self.plans = state, OrderedDict()
        if settings in self.plans:
            self.plans.move_to_end(settings)
            return self.plans[settings]
        plan: Plan = build()
        self.plans[settings] = plan
        while len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return plan

    def __iter__(self) -> Iterator[Plan]:
        return iter(self.plans.values())

    def __getstate__(self) -> dict[str, Any]:  # Rule K5
        return {"state": None, "plans": OrderedDict()}
