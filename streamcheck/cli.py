"""The ``streamcheck`` command: show a tiling plan, or verify that streaming a model is exact.

    streamcheck plan   PKG.MODULE:FACTORY --input 1x3x2048x2048 --tile 512 \
        [--split | --until MODULE | --stride S]
    streamcheck verify PKG.MODULE:FACTORY --input 1x3x2048x2048 --tile 512 \
        [--head PKG.MODULE:FACTORY] [--dtype float64|float32] [--json] [--device cpu|cuda]

``plan --until layer3`` (or ``--stride 8``, or ``--split`` for the longest streamable prefix) plans
the trunk ``streamcheck.split`` cuts from a whole classifier, in eval mode (streamed BatchNorm
uses its running statistics), and says what the head holds:
``streamcheck plan torchvision.models:resnet50 --until layer3 --input 1x3x8192x8192 --tile 4096``.

``FACTORY`` is called with no arguments and must return an ``nn.Module``; the current directory is
put on ``sys.path`` first, so a local ``my_models.py`` imports as ``my_models:factory``. A target
may also be a file path, ``path/to/models.py:factory``.

Exit status: 0 the check passed (or the plan was printed), 1 streaming is not equivalent,
2 usage error or a model that cannot be streamed (the message says why).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import streamcheck

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_USAGE = 2

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _UsageError(Exception):
    """A problem with the command line or the user's target; exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argparse usage error (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        with _cwd_on_sys_path():
            if args.command == "plan":
                return _plan(args)
            return _verify(args)
    except (_UsageError, streamcheck.StreamcheckError) as error:
        message = str(error)
        prefix = "" if message.startswith("streamcheck") else "streamcheck: error: "
        print(prefix + message, file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamcheck",
        description="Plan and verify streamed (tiled) training of a CNN trunk.",
    )
    parser.add_argument("--version", action="version", version=streamcheck.__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "target", metavar="PKG.MODULE:FACTORY", help="factory of the module to stream"
        )
        sub.add_argument(
            "--input",
            required=True,
            type=_shape,
            metavar="NxCxHxW",
            help="input shape, e.g. 1x3x2048x2048",
        )
        sub.add_argument(
            "--tile",
            required=True,
            type=_tile,
            metavar="T[xT...]",
            help="input-tile edge in px, e.g. 512 or 512x256",
        )

    plan = commands.add_parser("plan", help="print the tiling plan")
    add_common(plan)
    cut = plan.add_mutually_exclusive_group()
    cut.add_argument(
        "--split", action="store_true", help="plan the longest streamable prefix of a classifier"
    )
    cut.add_argument("--until", metavar="MODULE", help="plan the prefix up to this module")
    cut.add_argument(
        "--stride", type=int, metavar="S", help="plan the deepest prefix of total stride <= S"
    )
    verify = commands.add_parser(
        "verify", help="check that streamed outputs and gradients equal plain ones"
    )
    add_common(verify)
    verify.add_argument(
        "--head", metavar="PKG.MODULE:FACTORY", help="factory of the module after the trunk"
    )
    verify.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    verify.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    verify.add_argument(
        "--rtol", type=float, help="relative tolerance (default: depends on --dtype)"
    )
    verify.add_argument("--atol", type=float, help="absolute tolerance (default: 0)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random input and loss")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _plan(args: argparse.Namespace) -> int:
    module = _build(args.target)
    if args.split or args.until is not None or args.stride is not None:
        module.eval()  # streamed BatchNorm uses running statistics (train-mode BN is non-local)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stopped_by is printed below
            cut = streamcheck.split(
                module, until=args.until, stride=args.stride, input_shape=args.input, tile=args.tile
            )
        print(_describe(cut))
        if cut.stopped_by is not None:
            print(f"stopped: {cut.stopped_by}", file=sys.stderr)
        module = cut.trunk
    print(streamcheck.plan(module, args.input, tile=args.tile))
    return EXIT_OK


def _describe(cut: streamcheck.Split) -> str:
    """What trunk and head hold, for ``plan --until``."""

    def part(name: str, module: torch.nn.Module) -> str:
        n = sum(p.numel() for p in module.parameters())
        return f"{name}  {', '.join(cut.modules(module))} ({n / 1e6:.2f} M parameters)"

    stride = " x ".join(str(s) for s in cut.total_stride)
    return "\n".join(
        [
            f"split after '{cut.cut}' (total stride {stride}; planned in eval mode)",
            part("trunk", cut.trunk),
            part("head ", cut.head),
            "",
        ]
    )


def _verify(args: argparse.Namespace) -> int:
    from streamcheck.testing.checker import check_streaming_equivalence

    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: CUDA is not available")
    module = _build(args.target)
    head = _build(args.head) if args.head else None
    dtype = _DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.input, generator=generator, dtype=dtype).to(args.device)
    report = check_streaming_equivalence(
        module,
        x,
        tile=args.tile,
        head=head,
        dtype=dtype,
        rtol=args.rtol,
        atol=args.atol,
        seed=args.seed,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK if report.passed else EXIT_NOT_EQUIVALENT


def _shape(text: str) -> tuple[int, ...]:
    dims = _ints(text)
    if len(dims) < 3:
        raise argparse.ArgumentTypeError(
            f"expected N x C x spatial dims like 1x3x2048x2048, got {text!r}"
        )
    return dims


def _tile(text: str) -> int | tuple[int, ...]:
    dims = _ints(text)
    return dims[0] if len(dims) == 1 else dims


def _ints(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers joined by 'x', got {text!r}"
        ) from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive integers joined by 'x', got {text!r}")
    return dims


def _build(target: str) -> torch.nn.Module:
    """Import ``module:factory`` (or ``file.py:factory``), call the factory, check the result."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"target must look like PKG.MODULE:FACTORY, got {target!r}")
    try:
        namespace: Any = _import(module_name)
    except ImportError as error:
        raise _UsageError(f"cannot import {module_name!r} (from {os.getcwd()}): {error}") from error
    factory: Any = namespace
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise _UsageError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise _UsageError(f"{target!r} is not callable")
    try:
        built = factory()
    except Exception as error:
        traceback.print_exc()
        raise _UsageError(f"calling {target!r} failed: {type(error).__name__}: {error}") from error
    if not isinstance(built, torch.nn.Module):
        raise _UsageError(f"{target!r} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def _import(name: str) -> Any:
    if name.endswith(".py"):
        path = Path(name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None or not path.is_file():
            raise ImportError(f"no such file: {path}")
        namespace = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(namespace)
        return namespace
    importlib.invalidate_caches()  # the module may have been written since start-up
    return importlib.import_module(name)


@contextlib.contextmanager
def _cwd_on_sys_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


if __name__ == "__main__":
    raise SystemExit(main())
