"""The cases, as data: a name, the network, the settings, and one training step as the measured body.

Setup (network, input, memory format, compilation, wrappers) is built here apart from the measured
body, the callable ``Workload.step``: one forward + backward (loss = output.sum()), parameter
gradients left in ``.grad``. A case's settings are all named in its ``settings`` text, so that
every ratio between two cases can say what each side ran with (Rule B2 in ``analysis.py``).

Rules (workload):

KS1. A point is keyed by its case's *resolved* settings (``Settings.key``), never by the case's
    name, which is a label: a rerun after an engine default changed measures again, and two names
    for the same settings are one measurement.
KS2. A committed row is read by the settings it recorded (``recorded_settings``), so a row stays
    what it measured whatever its name means today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

# The U-Nets are built in suites/unet/networks.py.
NETWORKS = ("paper", "table2", "resnet18", "unet2d", "unet3d")
# Networks built as Sequential(streamed trunk, head).
TWO_PART = ("table2", "resnet18")
KINDS = ("conventional", "streamcheck", "lightstream")


@dataclass(frozen=True)
class Settings:
    """Resolved settings: what a row measured (Rule KS1). Two case names with equal settings
    measure the same thing; a case whose meaning changes (an engine default) gets other settings.

    >>> case("streamcheck_defaults").resolved().key  # Rule FD2: kept freed memory; FD1: NCHW tiles
    'streamcheck/paper/keep_freed'
    """

    kind: str
    network: str
    channels_last: bool
    keep_freed: bool
    huge_pages: bool
    compile: bool

    @property
    def key(self) -> str:
        on = [
            f for f in ("channels_last", "keep_freed", "huge_pages", "compile") if getattr(self, f)
        ]
        return f"{self.kind}/{self.network}/{'+'.join(on) or 'plain'}"


# Rule KS2: a committed row's settings text -> the flags it names (texts of every era).
SETTING_WORDS = {
    "channels_last": ("channels-last",),
    "keep_freed": ("keep_freed_host_memory()", "kept freed memory"),
    "huge_pages": ("huge pages",),
    "compile": ("torch.compile",),
}


def recorded_settings(name: str, text: str | None) -> Settings | None:
    """Rule KS2: the settings a row of case ``name`` was measured with: the ones its recorded
    settings text names (what the name meant then), else the case's (a row from before texts
    were recorded); None for a name no case has.

    >>> text = "streamcheck defaults: on a CPU channels-last float32 tiles + kept freed memory"
    >>> recorded_settings("streamcheck_defaults", text).key  # the defaults of that time
    'streamcheck/paper/channels_last+keep_freed'
    """
    if name not in CASES:
        return None
    c = CASES[name]
    if text is None:
        return c.resolved()
    flags = {f: any(w in text for w in words) for f, words in SETTING_WORDS.items()}
    return Settings(c.kind, c.network, **flags)


@dataclass(frozen=True)
class Case:
    """One way of running a training step; ``name`` is the row's name in the results file."""

    name: str
    kind: str  # one of KINDS
    network: str = "paper"  # one of NETWORKS
    # conventional: network and image; streamcheck: the engine option (None: its own default)
    channels_last: bool | None = False
    # streamcheck.keep_freed_host_memory() first (CPU); None: the engine's default (Rule FD2)
    keep_freed: bool | None = False
    huge_pages: bool = False  # THP_MEM_ALLOC_ENABLE=1 (PyTorch asks for transparent huge pages)
    compile: bool = False  # conventional: torch.compile(network); streamcheck: compile=True

    @property
    def settings(self) -> str:
        """The settings in words: what a ratio's side ran with."""
        if self.channels_last is None and self.keep_freed is None:
            compiled = " + torch.compile" if self.compile else ""
            return (
                f"streamcheck defaults: tiles in the image's layout + kept freed memory{compiled}"
            )
        parts = [
            ("channels-last", self.channels_last),
            ("keep_freed_host_memory()", self.keep_freed),
            ("huge pages", self.huge_pages),
            ("torch.compile", self.compile),
        ]
        named = [name for name, on in parts if on]
        return " + ".join(named) if named else "PyTorch defaults"

    @property
    def label(self) -> str:
        """``name (settings)``: how a ratio names one side."""
        return f"{self.name} ({self.settings})"

    def resolved(self) -> Settings:
        """What the case runs with on a CPU once streamcheck's defaults (None) are resolved
        (engine Rules FD1-FD2: the image's layout, kept freed memory)."""
        keep_freed = self.keep_freed if self.keep_freed is not None else self.kind == "streamcheck"
        flags = (bool(self.channels_last), keep_freed, self.huge_pages, self.compile)
        return Settings(self.kind, self.network, *flags)

    def environment_variables(self) -> dict[str, str]:
        """What the case's fresh process needs in its environment (set before torch starts)."""
        return {"THP_MEM_ALLOC_ENABLE": "1"} if self.huge_pages else {}


def _case(name: str, kind: str, **settings: Any) -> Case:
    return Case(name, kind, **settings)


TUNED = {"channels_last": True, "keep_freed": True}
DEFAULTS: dict[str, Any] = {"channels_last": None, "keep_freed": None}  # streamcheck's own
# The paper network's cases. *_tuned: channels-last + kept freed memory (issue 17's "tuned"),
# given to conventional training too so that like is compared with like; *_compiled adds
# torch.compile on top. The single-setting cases are the speed study (suite ``speed``).
PAPER_CASES = [
    _case("conventional", "conventional"),
    _case("conventional_tuned", "conventional", **TUNED),
    _case("conventional_compiled", "conventional", **TUNED, compile=True),
    _case("conventional_channels_last", "conventional", channels_last=True),
    _case("conventional_keep_freed", "conventional", keep_freed=True),
    _case("conventional_huge_pages", "conventional", huge_pages=True),
    _case("conventional_compiled_defaults", "conventional", compile=True),
    _case("conventional_kept_compiled", "conventional", keep_freed=True, compile=True),
    _case("conventional_huge_pages_compiled", "conventional", huge_pages=True, compile=True),
    _case("streamcheck", "streamcheck"),
    _case("streamcheck_defaults", "streamcheck", **DEFAULTS),
    _case("streamcheck_tuned", "streamcheck", **TUNED),
    _case("streamcheck_compiled", "streamcheck", **TUNED, compile=True),
    _case("streamcheck_defaults_compiled", "streamcheck", **DEFAULTS, compile=True),
    _case("streamcheck_channels_last", "streamcheck", channels_last=True),
    _case("streamcheck_keep_freed", "streamcheck", keep_freed=True),
    _case("streamcheck_huge_pages", "streamcheck", huge_pages=True),
    _case("lightstream", "lightstream"),
]
# The second network (issue 17: the speed settings checked off the benchmark network): the same
# settings on a ResNet-18 trunk. Not compiled streaming: dynamo meets the per-function
# recompile limit in its tile programs (many layer shapes per program) and runs them eagerly.
RESNET18_LIKE = (
    "conventional",
    "conventional_keep_freed",
    "conventional_tuned",
    "conventional_kept_compiled",
    "streamcheck",
    "streamcheck_defaults",
    "streamcheck_tuned",
)
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        *PAPER_CASES,
        _case("table2_conventional", "conventional", network="table2"),
        _case("table2_streamcheck", "streamcheck", network="table2"),
        _case("table2_streamcheck_tuned", "streamcheck", network="table2", **TUNED),
        *(
            replace(c, name=f"resnet18_{c.name}", network="resnet18")
            for c in PAPER_CASES
            if c.name in RESNET18_LIKE
        ),
        *(
            _case(f"{unet}_{kind}", kind, network=unet)
            for unet in ("unet2d", "unet3d")
            for kind in ("conventional", "streamcheck")
        ),
    ]
}


def case(name: str) -> Case:
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return CASES[name]


def paper_network() -> nn.Sequential:
    """Figs 2-3 of the paper: three 3x3 convs (padding 1) with 3, 64 and 3 output channels."""
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 3, 3, padding=1),
    )


def table2_network() -> tuple[nn.Sequential, nn.Sequential]:
    """(streamed trunk, head) of the paper's Table 2 (TUPAC16) network.

    Pairs of 3x3 convs (32, 64, 128, 256, 512) each followed by a 2x2 max-pool are streamed; the
    final seven layers (two pairs of 512-channel convs with BatchNorm, a max-pool between them,
    global max-pool, dropout 0.5, fully connected) are not, as in the paper's Section 6.2.
    """

    def pair(c_in: int, c_out: int, *, norm: bool = False) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            # No bias before BatchNorm: it would be cancelled, and its gradient is zero (up to
            # rounding, which a relative gradient error would then measure against itself).
            layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not norm))
            layers += [nn.BatchNorm2d(c_out)] if norm else []
            layers.append(nn.ReLU())
        return layers

    trunk: list[nn.Module] = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 256), (256, 512)):
        trunk += [*pair(c_in, c_out), nn.MaxPool2d(2)]
    head = [
        *pair(512, 512, norm=True),
        nn.MaxPool2d(2),
        *pair(512, 512, norm=True),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(512, 1),
    ]
    return nn.Sequential(*trunk), nn.Sequential(*head)


def resnet18_network() -> tuple[nn.Module, nn.Module]:
    """(streamed trunk, head) of torchvision's ResNet-18 (random init), in eval mode
    (``suites/trunks.py``): the trunk is everything before the global average pool (conv1 to
    layer4, output stride 32, its tiles overlap by 217 + 186 px per axis), the head the pool and
    the classifier. In training mode BatchNorm normalises by statistics of the whole image, which
    costs one tile pass per level (plan Rule PL1); the benchmark measures the frozen network, and
    conventional training runs in the same mode.
    """
    from suites.trunks import resnet_halves

    return resnet_halves("resnet18")


@dataclass
class Workload:
    """A ready-to-run training step and what is known about its tiling."""

    step: Callable[[], None]
    network: nn.Module
    image: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def spatial_dims(network: str) -> int:
    """Spatial axes of ``network``'s image (the 3-D U-Net's is a volume)."""
    return 3 if network == "unet3d" else 2


def build_inputs(
    *, network: str = "paper", input_px: int, device: str, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, torch.Tensor]:
    """The network (seeded init) and a (1, 3, input_px, input_px) image (a volume for the 3-D
    U-Net): identical in every process.

    The Table 2 and ResNet-18 networks are ``Sequential(trunk, head)`` (``TWO_PART``).
    """
    torch.manual_seed(seed)
    if network == "paper":
        module: nn.Module = paper_network()
    elif network == "table2":
        module = nn.Sequential(*table2_network())
    elif network == "resnet18":
        module = nn.Sequential(*resnet18_network())
    elif network in ("unet2d", "unet3d"):
        from suites.unet.networks import benchmark_unet

        module = benchmark_unet(network)
    else:
        raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
    module = module.to(device=device, dtype=dtype)  # init in float32, then cast
    generator = torch.Generator().manual_seed(seed + 1)
    # Drawn in float32 whatever the dtype, so that a float64 run sees exactly the same image.
    shape = (1, 3, *(input_px,) * spatial_dims(network))
    image = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return module, image


def _zero_grads(network: nn.Module) -> None:
    for p in network.parameters():
        p.grad = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build(
    name: str, *, input_px: int, tile_px: int | None, device: str, dtype: torch.dtype, seed: int
) -> Workload:
    """Set up case ``name`` (see ``CASES``) on a fresh network and image."""
    c = case(name)
    info: dict[str, Any] = {"settings": c.settings}
    if c.keep_freed and device == "cpu":
        import streamcheck

        info["keep_freed_host_memory"] = streamcheck.keep_freed_host_memory()
    network, image = build_inputs(
        network=c.network, input_px=input_px, device=device, dtype=dtype, seed=seed
    )
    # Table 2: the head has dropout; the same draw in every step and every process.
    reseed = (lambda: torch.manual_seed(seed + 2)) if c.network == "table2" else (lambda: None)
    if c.kind == "conventional":
        if c.channels_last:
            network = network.to(memory_format=torch.channels_last)
            image = image.contiguous(memory_format=torch.channels_last)
        model: Callable[[torch.Tensor], torch.Tensor] = network
        if c.compile:
            model = torch.compile(network)  # type: ignore[assignment]

        def step() -> None:
            _zero_grads(network)
            reseed()
            model(image).sum().backward()
            _sync(device)

        return Workload(step, network, image, info | {"n_tiles": 1, **_compiled(c)})

    assert tile_px is not None, "streaming cases need tile_px"
    if c.kind == "streamcheck":
        import streamcheck

        trunk, head = (
            (network[0], network[1]) if c.network in TWO_PART else (network, nn.Identity())
        )
        # None: the engine decides (NOTE [ Fast defaults ]); otherwise the case's setting, with
        # kept freed memory only where the case took it above.
        options: dict[str, Any] = {}
        if c.channels_last is not None:
            options["channels_last"] = c.channels_last
        if c.keep_freed is not None:
            options["keep_host_memory"] = c.keep_freed
        streamed = streamcheck.Streamed(trunk, tile=tile_px, compile=c.compile, **options)
        plan = streamed.plan(image.shape, dtype=image.dtype)

        def step() -> None:
            _zero_grads(network)
            reseed()
            head(streamed(image)).sum().backward()
            _sync(device)
            if c.compile:  # compiled tile programs: how many, and their first calls' seconds
                records = streamed.compile_report(image.shape)
                info["compiled_programs"] = sum(r.compiled for r in records)
                info["compile_s"] = sum(r.seconds for r in records)

        info |= {
            "n_tiles": plan.n_tiles,
            "tile_px_used": plan.tile_px_used[0],
            "overlap_px": list(plan.overlap_px[0]),
            "peak_bytes_estimate": plan.peak_bytes_estimate,
            **_compiled(c),
            "output_bytes": plan.output_bytes,  # the stitched output and its gradient
        }
        return Workload(step, network, image, info)

    if c.kind == "lightstream":
        from . import peer

        step, peer_info = peer.build(network, image, tile_px=tile_px, device=device)
        peer_info |= info  # in place: the step fills in n_tiles
        return Workload(step, network, image, peer_info)

    raise ValueError(f"unknown kind {c.kind!r}; expected one of {KINDS}")


def _compiled(c: Case) -> dict[str, Any]:
    if not c.compile:
        return {}
    if c.kind == "streamcheck":
        return {"compile": "Streamed(..., compile=True): torch.compile per tile class, inductor"}
    return {"compile": "torch.compile(network), inductor"}


def dynamo_graphs() -> int:
    """How many graphs dynamo compiled in this process (0: the compiled code was bypassed)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reference_gradients(
    *, network: str, input_px: int, device: str, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Parameter gradients of conventional training (PyTorch defaults) on the same network and image."""
    module, image = build_inputs(
        network=network, input_px=input_px, device=device, dtype=dtype, seed=seed
    )
    if network == "table2":
        torch.manual_seed(seed + 2)
    module(image).sum().backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def max_relative_grad_error(network: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref| (parameters as named in ``reference``)."""
    worst = 0.0
    grads = {name: p.grad for name, p in network.named_parameters()}
    for name, ref in reference.items():
        grad = grads[name]
        assert grad is not None, f"no gradient for {name}"
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (grad.to(ref.dtype) - ref).abs().max().item() / scale)
    return worst
