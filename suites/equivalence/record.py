"""Draw networks, check each, and write the record (``record.json``).

NOTE [ The equivalence record ]
Rule R1. Networks come from ``streamcheck.testing.streaming_cases``, drawn by hypothesis itself
         (``@given`` with ``max_examples=N``, ``database=None``, generation only, a fixed seed),
         so the record replays: the same seed and versions draw the same networks.
Rule R1b. Four families: chains (``streaming_cases``: nested nn.Sequential stacks), DAGs
         (``streamcheck.testing.graphs.dag_cases``: residual add and multiply, concatenation,
         branches that rejoin, a conv used twice, permute + LayerNorm/Linear over channels,
         FrozenBatchNorm, between strided segments), U-Nets and pyramids
         (``streamcheck.testing.unets``: encoder-decoders with ConvTranspose and upsampling, and
         FPN-like networks with several outputs, compared output by output). Each entry names its
         ``family``; the summary gives every figure per family too (``by_family``).
Rule R1c. Families may be re-run alone (``--only FAMILY``): the other families' cases and the
         trunks are kept from the record on disk, the re-run family's are replaced. Every run is
         listed in ``metadata.runs`` (command, times, environment) and every case names its run
         (``run``), so a merged record says which commit and command each row comes from.
Rule R2. A case whose tile covers the whole input (one tile) streams nothing; it is skipped while
         drawing (``assume``) and counted as ``single_tile_draws_skipped``.
Rule R2b. A draw on which PyTorch itself is undefined is skipped too and counted as
         ``ill_posed_draws_skipped``: a pooling window that covers padding only (MaxPool with
         ceil_mode and dilation can place one), whose plain output is -inf (or NaN for an average)
         and whose plain backward writes out of bounds (it corrupted the heap, ``free(): invalid
         next size``). Detected by a plain forward of a finite input with non-finite output.
Rule R3. Each case is run by ``check_streaming_equivalence`` with its default tolerances (float64:
         rtol 1e-10; float32: 8 eps sqrt(L), widened by 4x the plain run's own rounding error
         against float64, checker Rule 3b; rtol relative to the size of a gradient's terms where
         they cancel, checker Rule 3c): plain and streamed in the same dtype, output, input
         gradient and every parameter gradient. An exception (the engine refusing a drawn case, or
         crashing) is a failure, recorded with the case.
Rule R4. float64 draws every layer option the strategies know. Reflect padding only if the
         engine streams the known narrow-border case exactly (``reflect_padding_streams``): it
         crashed there (pinned by ``tests/test_properties.py``), and a crash is not news each run.
         float32 draws smooth activations and average pools only: at a ReLU kink or a max-pool
         tie a rounding difference flips the gradient by O(1), so no float32 tolerance can hold
         there (float64 covers kinked networks exactly); see NOTE [ float32 tolerance ] in
         tests/test_properties.py. The drawing is ``draws.py``.
Rule R5. Errors are relative to the reference's scale (checker Rule 3: its largest magnitude, or
         the size of its terms where they cancel, Rule 3c); the record
         keeps, per case, the worst relative error per kind (output, param_grad, input_grad) and,
         per dtype, the worst over all cases with the case that reached it.
Rule R6. A float32 failure is re-checked in float64 (``float64_recheck``): if the same network
         streams exactly there, the float32 difference is rounding that exceeded the checker's
         tolerance (e.g. amplified by an ill-conditioned forward, which the tolerance does not
         measure), not a streaming error. It still counts as a failure: the record does not move the tolerance.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import streamcheck
from streamcheck.testing import (
    StreamingCase,
    check_streaming_equivalence,
)
from suites import trunks as T
from suites.environment import environment
from suites.rows import read_rows

from .draws import (
    FAMILIES,
    REFLECT_BUG,
    draw_cases,
    draw_options,
    examples_per_ndim,
    layer_kinds,
    named_leaves,
    reflect_padding_streams,
)

REPO = Path(__file__).resolve().parents[2]
NDIMS = (1, 2, 3)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
KINDS = ("output", "param_grad", "input_grad")


def _worst(rows: Sequence[Any]) -> dict[str, float | None]:
    """Worst relative error per kind (None: no such tensor, e.g. a network without parameters)."""
    worst: dict[str, float | None] = {}
    for kind in (*KINDS, "buffers"):
        errors = [row.max_rel_error for row in rows if row.kind == kind]
        if errors or kind != "buffers":
            worst[kind] = _json(max(errors)) if errors else None
    return worst


def _fraction_of_rtol(report: Any) -> float | None:
    """How much of its tolerance the worst tensor used: max over rows of max|a - b| / tolerance."""
    return _json(
        max(
            (
                row.max_abs_error / row.tolerance if row.tolerance > 0 else 0.0
                for row in report.rows
            ),
            default=0.0,
        )
    )


def _json(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def check_case(case: StreamingCase, dtype: torch.dtype, *, family: str = "chain") -> dict[str, Any]:
    """Run the checker on one drawn case (Rule R3); a JSON-ready dict."""
    leaves = named_leaves(case.module)
    entry: dict[str, Any] = {
        "family": family,
        "ndim": case.ndim,
        "dtype": str(dtype).removeprefix("torch."),
        "input_shape": list(case.image_shape),
        "tile": list(case.tile) if isinstance(case.tile, tuple) else case.tile,
        "receptive_field_px": list(case.geometry.receptive_field_px),
        # chains: the layers in order; DAGs: each layer with its path (the joins show in paths)
        "layers": [repr(m) if family == "chain" else f"{n}: {m!r}" for n, m in leaves],
        "kinds": layer_kinds(case.module),
        "n_parameters": sum(p.numel() for p in case.module.parameters()),
    }
    start = time.perf_counter()
    try:
        report = check_streaming_equivalence(
            case.module, case.image_shape, tile=case.tile, dtype=dtype, seed=case.seed
        )
    except Exception as error:  # Rule R3: a drawn case the engine refuses or crashes on
        entry.update(passed=False, error=f"{type(error).__name__}: {error}", n_tiles=None)
        entry["time_s"] = round(time.perf_counter() - start, 4)
        return entry
    entry.update(
        passed=report.passed,
        n_tiles=report.n_tiles,
        rtol=report.rtol,
        accumulation_length=report.accumulation_length,
        worst_rel_error=_worst(report.rows),
        worst_fraction_of_rtol=_fraction_of_rtol(report),
        time_s=round(time.perf_counter() - start, 4),
    )
    if not report.passed:
        entry["error"] = str(report)
        if dtype != torch.float64:  # Rule R6
            recheck = check_streaming_equivalence(
                case.module, case.image_shape, tile=case.tile, dtype=torch.float64, seed=case.seed
            )
            entry["float64_recheck"] = {
                "passed": recheck.passed,
                "worst_rel_error": _worst(recheck.rows),
            }
    return entry


def check_trunk(trunk: T.Trunk, dtype: torch.dtype) -> dict[str, Any]:
    """Run the checker on a torchvision trunk (default tolerances)."""
    module = T.checked(trunk.build())
    x = torch.randn(trunk.input_shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    entry: dict[str, Any] = {
        "name": trunk.name,
        "description": trunk.description,
        "dtype": str(dtype).removeprefix("torch."),
        "input_shape": list(trunk.input_shape),
        "tile": trunk.tile,
        "n_parameters": sum(p.numel() for p in module.parameters()),
    }
    try:
        plan = streamcheck.plan(module, trunk.input_shape, tile=trunk.tile)
        report = check_streaming_equivalence(module, x, tile=trunk.tile, dtype=dtype)
    except Exception as error:
        entry.update(passed=False, error=f"{type(error).__name__}: {error}")
        return entry
    entry.update(
        passed=report.passed,
        n_tiles=report.n_tiles,
        receptive_field_px=list(plan.receptive_field_px),
        rtol=report.rtol,
        n_tensors=len(report.rows),
        worst_rel_error=_worst(report.rows),
        worst_fraction_of_rtol=_fraction_of_rtol(report),
        time_s=round(time.perf_counter() - start, 3),
    )
    if not report.passed:
        entry["error"] = str(report)
    return entry


def summarize(cases: list[dict[str, Any]], *, family: str | None = None) -> dict[str, Any]:
    """Counts and worst errors over the drawn cases (Rule R5), or over one family's (Rule R1b);
    case indices are into ``cases``."""

    def mine_of(c: dict[str, Any], dtype: str) -> bool:
        return c["dtype"] == dtype and family in (None, c.get("family", "chain"))

    summary: dict[str, Any] = {"networks": {}, "worst_rel_error": {}, "tiles_per_case": {}}
    for dtype in DTYPES:
        mine = [c for c in cases if mine_of(c, dtype)]
        summary["networks"][dtype] = {
            f"{ndim}d": sum(c["ndim"] == ndim for c in mine) for ndim in NDIMS
        }
        tiles = [c["n_tiles"] for c in mine if c.get("n_tiles") is not None]
        summary["tiles_per_case"][dtype] = {
            "min": min(tiles) if tiles else None,
            "max": max(tiles) if tiles else None,
            "median": sorted(tiles)[len(tiles) // 2] if tiles else None,
        }
        worst: dict[str, Any] = {}
        for kind in KINDS:
            candidates = [
                (c["worst_rel_error"][kind], i)
                for i, c in enumerate(cases)
                if mine_of(c, dtype)
                and "worst_rel_error" in c
                and c["worst_rel_error"].get(kind) is not None
            ]
            if candidates:
                value, index = max(candidates)
                worst[kind] = {"max_rel_error": value, "case": index, "rtol": cases[index]["rtol"]}
            else:
                worst[kind] = None
        summary["worst_rel_error"][dtype] = worst
        fractions = [c["worst_fraction_of_rtol"] for c in mine if c.get("worst_fraction_of_rtol")]
        summary.setdefault("worst_fraction_of_rtol", {})[dtype] = max(fractions, default=None)
    chosen = [c for c in cases if family in (None, c.get("family", "chain"))]
    kinds = Counter(k for c in chosen for k in c["kinds"])
    summary["layer_kinds"] = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    summary["layer_kinds_networks"] = dict(
        sorted(
            Counter(k for c in chosen for k in set(c["kinds"])).items(),
            key=lambda kv: (-kv[1], kv[0]),
        )
    )
    summary["n_cases"] = len(chosen)
    summary["n_failed"] = sum(not c["passed"] for c in chosen)
    if family is None:
        summary["by_family"] = {
            name: summarize(cases, family=name)
            for name in FAMILIES
            if any(c.get("family", "chain") == name for c in cases)
        }
    return summary


def _hypothesis_version() -> str:
    import hypothesis

    return str(hypothesis.__version__)


def make_record(
    *,
    examples: dict[str, int],
    seed: int,
    with_trunks: bool,
    command: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Draw and check ``examples[family]`` networks of every family per dtype (each split over
    1D/2D/3D), then the trunks."""
    with warnings.catch_warnings():
        # PyTorch's note about its own 'same' padding of even kernels (the strategies draw them).
        warnings.filterwarnings("ignore", "Using padding='same' with even kernel")
        record = _make_record(
            examples=examples, seed=seed, with_trunks=with_trunks, command=command, log=log
        )
    families = [f for f, n in examples.items() if n > 0]
    record["metadata"]["runs"] = [_run(record["metadata"], families)]  # Rule R1c
    return record


def _make_record(
    *,
    examples: dict[str, int],
    seed: int,
    with_trunks: bool,
    command: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    started = time.perf_counter()
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    families = [family for family in FAMILIES if examples.get(family, 0) > 0]
    reflect = reflect_padding_streams()
    options = draw_options(reflect=reflect)
    log(
        "reflect padding: "
        + (
            "streams the pinned narrow-border case exactly; drawn"
            if reflect
            else f"not drawn, {REFLECT_BUG}"
        )
    )
    cases: list[dict[str, Any]] = []
    draws: dict[str, Any] = {}
    groups = [(f, d, n) for f in families for d in DTYPES for n in NDIMS]
    steps = len(groups) + (len(T.TRUNKS) * len(DTYPES) if with_trunks else 0)
    step = 0
    for family, dtype_name, ndim in groups:
        dtype = DTYPES[dtype_name]
        per_ndim = examples_per_ndim(examples[family])
        step += 1
        t0 = time.perf_counter()
        # chains keep the seeds of the records before DAGs were added (Rule R1: they replay)
        group_seed = seed + 10 * ndim + (0 if dtype_name == "float64" else 1)
        group_seed += 100 * list(FAMILIES).index(family)  # dag: +100 as before, then 200, 300
        drawn, skipped = draw_cases(
            ndim, per_ndim[ndim], seed=group_seed, options=options[dtype_name], family=family
        )
        results = [check_case(case, dtype, family=family) for case in drawn]
        cases.extend(results)
        group = f"{ndim}d-{dtype_name}" if family == "chain" else f"{family}-{ndim}d-{dtype_name}"
        draws[group] = {
            "requested": per_ndim[ndim],
            "drawn": len(drawn),
            **skipped,
            "hypothesis_seed": group_seed,
        }
        worst = max(
            (v for r in results for v in r.get("worst_rel_error", {}).values() if v is not None),
            default=0.0,
        )
        failed = sum(not r["passed"] for r in results)
        log(
            f"[{step}/{steps}] {family} {ndim}D {dtype_name}: {len(results)} networks checked "
            f"(skipped: {skipped['single_tile_draws_skipped']} single-tile, "
            f"{skipped['ill_posed_draws_skipped']} ill-posed draws), {failed} failed, worst rel err "
            f"{worst:.2e}, {time.perf_counter() - t0:.1f} s"
        )
    trunk_rows: list[dict[str, Any]] = []
    if with_trunks:
        for trunk in T.TRUNKS:
            for dtype_name, dtype in DTYPES.items():
                step += 1
                row = check_trunk(trunk, dtype)
                trunk_rows.append(row)
                worst = max(
                    (v for v in row.get("worst_rel_error", {}).values() if v is not None),
                    default=float("nan"),
                )
                log(
                    f"[{step}/{steps}] {trunk.name} {trunk.description} {dtype_name}: "
                    f"{'passed' if row['passed'] else 'FAILED'}, {row.get('n_tiles')} tiles, "
                    f"worst rel err {worst:.2e}, {row.get('time_s', 0):.1f} s"
                )
    summary = summarize(cases)
    failures = failures_of(cases, trunk_rows)
    for case in cases:
        case["run"] = 0  # Rule R1c
    return {
        "schema": "streamcheck.equivalence/1",
        "metadata": {
            "command": command,
            "started_utc": started_utc,
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 1),
            "examples_per_dtype": examples["chain"],
            **{f"{f}_examples_per_dtype": examples.get(f, 0) for f in FAMILIES if f != "chain"},
            "seed": seed,
            "environment": environment("cpu"),
            "hypothesis": _hypothesis_version(),
        },
        "method": {
            "checker": "streamcheck.testing.check_streaming_equivalence",
            "strategy": "streamcheck.testing.streaming_cases",
            "strategies": {
                "chain": "streamcheck.testing.streaming_cases",
                "dag": "streamcheck.testing.graphs.dag_cases",
                "unet": "streamcheck.testing.unets.unet_cases",
                "pyramid": "streamcheck.testing.unets.pyramid_cases",
            },
            "draw_options": {
                dtype: {
                    key: [repr(factory()) for factory in value]
                    if key == "activations"
                    else list(value)
                    for key, value in opts.items()
                }
                for dtype, opts in options.items()
            },
            "tolerances": {
                "float64": "rtol 1e-10 relative to max(max|reference|, the size of the terms of "
                "each gradient, checker Rule 3c)",
                "float32": "rtol 8 * eps * sqrt(N * pixels) relative to the same scale, plus 4x "
                "the plain run's own rounding error against float64 (checker Rule 3b)",
            },
            "excluded": {
                "ill-posed draws": "a pooling window over padding only: PyTorch's own output is "
                "-inf or NaN and its backward writes out of bounds (Rule R2b of "
                "suites/equivalence/record.py)",
                **({} if reflect else {"reflect padding": f"known engine bug: {REFLECT_BUG}"}),
                "kinked activations and max-pools in float32": "a rounding difference at a kink "
                "flips a gradient by O(1); float64 covers them exactly",
            },
            "draws": draws,
        },
        "summary": summary,
        "failures": failures,
        "trunks": trunk_rows,
        "cases": cases,
    }


def failures_of(
    cases: list[dict[str, Any]],
    trunk_rows: list[dict[str, Any]],
    *,
    earlier: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The failed cases and trunks; a kept case without its layers (``cases.jsonl`` drops them)
    takes them from the ``earlier`` record's failure of the same network (Rule R1c)."""
    keys = ("family", "ndim", "dtype", "input_shape", "tile")

    def layers(c: dict[str, Any]) -> Any:
        if "layers" in c:
            return c["layers"]
        same = [f for f in earlier if all(f.get(k) == c.get(k) for k in keys)]
        return same[0].get("layers") if same else None

    return [
        {"case": i}
        | {k: c.get(k, "chain" if k == "family" else None) for k in keys}
        | {
            "layers": layers(c),
            "error": c.get("error"),
            "float64_recheck": c.get("float64_recheck"),
        }
        for i, c in enumerate(cases)
        if not c["passed"]
    ] + [
        {"trunk": t["name"], "dtype": t["dtype"], "error": t.get("error")}
        for t in trunk_rows
        if not t["passed"]
    ]


def _run(metadata: dict[str, Any], families: Sequence[str]) -> dict[str, Any]:
    keys = ("command", "started_utc", "finished_utc", "wall_s", "environment", "hypothesis")
    return {k: metadata.get(k) for k in keys} | {"families": list(families)}


def merge_records(
    previous: dict[str, Any],
    previous_cases: list[dict[str, Any]],
    new: dict[str, Any],
    *,
    families: Sequence[str],
) -> dict[str, Any]:
    """Rule R1c: ``previous`` with the cases of ``families`` replaced by ``new``'s."""
    meta = previous["metadata"]
    runs = meta.get("runs") or [_run(meta, [f for f in FAMILIES if _has(previous_cases, f)])]
    kept = [
        dict(c) | {"run": c.get("run", 0)} for c in previous_cases if _family(c) not in families
    ]
    added = [c | {"run": len(runs)} for c in new["cases"]]
    runs = [*runs, _run(new["metadata"], families)]
    cases = kept + added
    trunks = previous.get("trunks", [])
    method = previous["method"] | {
        "strategies": new["method"]["strategies"],
        "draws": previous["method"].get("draws", {}) | new["method"]["draws"],
    }
    metadata = meta | {
        "command": " ; then ".join(str(run["command"]) for run in runs),
        "finished_utc": new["metadata"]["finished_utc"],
        "wall_s": round(sum(float(run["wall_s"] or 0) for run in runs), 1),
        "runs": runs,
        **{
            f"{f}_examples_per_dtype": new["metadata"][f"{f}_examples_per_dtype"]
            for f in families
            if f != "chain"
        },
    }
    return previous | {
        "metadata": metadata,
        "method": method,
        "summary": summarize(cases),
        "failures": failures_of(cases, trunks, earlier=previous.get("failures", [])),
        "trunks": trunks,
        "cases": cases,
    }


def _family(case: dict[str, Any]) -> str:
    return str(case.get("family", "chain"))


def _has(cases: list[dict[str, Any]], family: str) -> bool:
    return any(_family(c) == family for c in cases)


def read_record(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``record.json`` and the cases of ``cases.jsonl`` (their ``case`` index dropped)."""
    record = json.loads((out / "record.json").read_text())
    rows = read_rows(out / "cases.jsonl", required=("case",))  # the suites' one JSONL reader
    cases = [{k: v for k, v in row.items() if k != "case"} for row in rows]
    return record, cases


def write_record(record: dict[str, Any], out: Path) -> list[Path]:
    """``record.json`` (summary, trunks, failures, the worst cases in full) and ``cases.jsonl``
    (one line per drawn network, without its layer list: the seed replays it)."""
    out.mkdir(parents=True, exist_ok=True)
    cases = record["cases"]
    worst = {
        str(entry["case"]): cases[entry["case"]]
        for per_kind in record["summary"]["worst_rel_error"].values()
        for entry in per_kind.values()
        if entry is not None
    }
    main = {k: v for k, v in record.items() if k != "cases"} | {
        "cases_file": "cases.jsonl",
        "worst_cases": dict(sorted(worst.items(), key=lambda kv: int(kv[0]))),
    }
    paths = [out / "record.json", out / "cases.jsonl"]
    paths[0].write_text(json.dumps(main, indent=1) + "\n")
    paths[1].write_text(
        "".join(
            json.dumps({"case": i} | {k: v for k, v in c.items() if k != "layers"}) + "\n"
            for i, c in enumerate(cases)
        )
    )
    return paths


def main_command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", "suites.equivalence", *args])
