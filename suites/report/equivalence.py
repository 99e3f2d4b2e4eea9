"""Section 2 of the report: the equivalence record."""

from __future__ import annotations

from typing import Any

from .format import err, missing_note, plural, table
from .sources import Source, finite, get


# ------------------------------------------------------------------------------ 2. equivalence
def equivalence_section(eq: Source) -> str:
    parts = ["## 2. Equivalence: is streaming exact?", ""]
    if not eq.found:
        return "\n".join(parts + missing_note(eq, "python -m suites.equivalence"))
    rec = eq.data
    summary, meta, method = rec.get("summary", {}), rec.get("metadata", {}), rec.get("method", {})
    n_cases = summary.get("n_cases", "n/a")
    failures = rec.get("failures", [])
    trunks = rec.get("trunks", [])
    verdict = f"**{plural(len(failures), 'failure')}**" if failures else "**no failures**"
    families = summary.get("by_family", {})
    strategies = method.get("strategies") or {"chain": method.get("strategy", "the strategies")}
    drawn_from = " and ".join(
        f"{get(families, name, 'n_cases', default=n_cases if len(strategies) == 1 else 'n/a')} "
        f"{_FAMILY_LABELS.get(name, name)} from `{strategy}`"
        for name, strategy in strategies.items()
    )
    parts += [
        f"{n_cases} randomly generated networks (drawn by hypothesis, seed "
        f"{meta.get('seed', 'n/a')}: {drawn_from}) and "
        f"{len(trunks)} torchvision trunk checks were each run twice -- plainly and streamed tile by "
        f"tile -- on the same weights and input, and the output, the input gradient and every "
        f"parameter gradient compared by `{method.get('checker', 'the equivalence checker')}`: "
        f"{verdict}. Errors are max |streamed - plain| per tensor over its scale: max |plain|, or "
        "the size of a gradient's terms where they cancel (checker Rule 3c); the table gives "
        "the worst over all networks of each family and dtype.",
        "",
    ]
    parts.append(_results_table(summary, failures, method))
    parts += ["", "How the networks were drawn:", "", _draw_notes(method)]
    if failures:
        parts += ["", "### Failures", ""]
        for f in failures:
            parts += _failure(f)
    parts += ["", "### Layers the generated networks contained", "", _kinds_table(summary)]
    parts += ["", "### Torchvision trunks", ""]
    if trunks:
        parts += [
            "Random weights, eval mode (BatchNorm with random running statistics), checked in "
            "float64 and float32 with the checker's default tolerances.",
            "",
            _trunk_table(trunks),
        ]
    else:
        parts.append("Not in this record (it was made with `--quick` or `--no-trunks`).")
    parts += [
        "",
        f"Record: `{eq.folder.name}/record.json`, made by `{meta.get('command', 'n/a')}` "
        f"in {meta.get('wall_s', 'n/a')} s.",
    ]
    return "\n".join(parts)


_FAMILY_LABELS = {
    "chain": "chains (nested nn.Sequential)",
    "dag": "DAGs (residual add/multiply, concatenation, rejoined branches, a shared conv, "
    "permute + LayerNorm/Linear)",
    "unet": "U-Nets (ConvTranspose and upsampling, concatenated or added skips)",
    "pyramid": "pyramids (FPN-like, several outputs)",
    "statistics_chain": "chains with statistics over the map in training mode (BatchNorm, "
    "GroupNorm, InstanceNorm, GRN, squeeze-excite and ECA with every reduction)",
    "statistics_dag": "DAGs with statistics over the map in training mode",
    "statistics_unet": "U-Nets with statistics over the map in training mode",
}
_FAMILY_SHORT = {
    "chain": "chains",
    "dag": "DAGs",
    "unet": "U-Nets",
    "pyramid": "pyramids",
    "statistics_chain": "chains + statistics",
    "statistics_dag": "DAGs + statistics",
    "statistics_unet": "U-Nets + statistics",
}


def _results_table(
    summary: dict[str, Any], failures: list[dict[str, Any]], method: dict[str, Any]
) -> str:
    """One row per family (chains, DAGs; Rule R1b of the record) and dtype."""
    families = summary.get("by_family") or {"chain": summary}
    rows = []
    for family, part in families.items():
        for dtype in ("float64", "float32"):
            if dtype in part.get("networks", {}):
                rows.append(_result_row(family, dtype, part, failures, method))
    return table(
        "networks | dtype | count | 1D / 2D / 3D | tiles per network | output | parameter grads | input grad | tolerance | worst error / tolerance | failed",
        rows,
    )


def _result_row(
    family: str,
    dtype: str,
    part: dict[str, Any],
    failures: list[dict[str, Any]],
    method: dict[str, Any],
) -> list[Any]:
    counts = part["networks"][dtype]
    w = get(part, "worst_rel_error", dtype, default={})
    tiles = part.get("tiles_per_case", {})
    n_failed = sum(
        1
        for f in failures
        if f.get("dtype") == dtype and "trunk" not in f and f.get("family", "chain") == family
    )
    return [
        _FAMILY_SHORT.get(family, family),
        dtype,
        sum(v for v in counts.values() if finite(v)),
        " / ".join(str(counts.get(k, 0)) for k in ("1d", "2d", "3d")),
        f"{get(tiles, dtype, 'min', default='n/a')}-{get(tiles, dtype, 'max', default='n/a')}",
        err(get(w, "output", "max_rel_error")),
        err(get(w, "param_grad", "max_rel_error")),
        err(get(w, "input_grad", "max_rel_error")),
        _tolerance(method, dtype),
        err(get(part, "worst_fraction_of_rtol", dtype)),
        n_failed,
    ]


def _tolerance(method: dict[str, Any], dtype: str) -> str:
    text = get(method, "tolerances", dtype, default="n/a")
    return str(text).replace(" relative to max|reference|", "").replace("*", "x")


def _draw_notes(method: dict[str, Any]) -> str:
    lines = []
    for dtype, opts in method.get("draw_options", {}).items():
        desc = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in opts.items())
        lines.append(f"- {dtype} networks drawn with {desc}.")
    for what, why in method.get("excluded", {}).items():
        lines.append(f"- Not drawn: {what} -- {why}.")
    draws = method.get("draws", {})
    if draws:
        single, ill = (
            sum(d.get(key, 0) for d in draws.values())
            for key in ("single_tile_draws_skipped", "ill_posed_draws_skipped")
        )
        lines.append(
            f"- Draws skipped: {single} whose tile covered the whole input (nothing streamed), "
            f"{ill} ill-posed (PyTorch's own output not finite)."
        )
    return "\n".join(lines)


def _layer_group(name: str) -> str:
    if name.startswith("join: "):
        return "join"
    if "Conv" in name or "Pool" in name:
        return "window"
    if "(eval)" in name or "(train)" in name:
        return "mode"
    return "pointwise"


def _kinds_table(summary: dict[str, Any]) -> str:
    """Window layers one per row with their options; eval-mode layers; activations in one row."""
    kinds = summary.get("layer_kinds", {})
    networks = summary.get("layer_kinds_networks", {})
    if not kinds:
        return "The record lists no layer kinds."
    options: dict[str, list[str]] = {}
    for k, v in kinds.items():
        if ": " in k:
            layer, _, option = k.partition(": ")
            options.setdefault(layer, []).append(f"{option} ({v})")
    layers = [(k, v) for k, v in kinds.items() if ": " not in k]
    rows = [
        [k, v, networks.get(k, "n/a"), ", ".join(options.get(k, [])) or "-"]
        for k, v in layers
        if _layer_group(k) != "pointwise"
    ]
    pointwise = [(k, v) for k, v in layers if _layer_group(k) == "pointwise"]
    if pointwise:
        rows.append(
            [
                "pointwise activations",
                sum(v for _, v in pointwise),
                "-",
                ", ".join(f"{k} ({v})" for k, v in pointwise),
            ]
        )
    return table(
        ["layer", "times drawn", "networks", "options or kinds drawn (times)"], rows, align="lrrl"
    )


def _failure(f: dict[str, Any]) -> list[str]:
    what = (
        f"trunk {f['trunk']} ({f.get('dtype')})"
        if f.get("trunk")
        else (
            f"network {f.get('case')} ({f.get('dtype')}, input {f.get('input_shape')}, tile "
            f"{f.get('tile')}): `{'`; `'.join(f.get('layers') or [])}`"
        )
    )
    lines = [f"Failed: {what}.", "", "```", *str(f.get("error")).splitlines(), "```", ""]
    recheck = f.get("float64_recheck")
    if isinstance(recheck, dict):
        worst = [v for v in (recheck.get("worst_rel_error") or {}).values() if finite(v)]
        text = (
            "The same network in float64: "
            + ("passed" if recheck.get("passed") else "FAILED")
            + f", worst relative error {err(max(worst)) if worst else 'n/a'}."
        )
        if recheck.get("passed"):
            text += (
                " Streaming is exact on it; the float32 difference is rounding beyond the "
                "checker's float32 tolerance, which does not measure how much an ill-conditioned "
                "forward amplifies rounding (reports/equivalence/README.md)."
            )
        lines += [text, ""]
    return lines


def _trunk_table(trunks: list[dict[str, Any]]) -> str:
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for t in trunks:
        by_name.setdefault(t.get("name", "?"), {})[t.get("dtype", "?")] = t
    rows = []
    for name, per_dtype in by_name.items():
        first = next(iter(per_dtype.values()))
        shape = first.get("input_shape") or []
        cells = [
            name,
            first.get("description", ""),
            "x".join(map(str, shape[2:])) if shape else "n/a",
            first.get("tile", "n/a"),
            first.get("n_tiles", "n/a"),
        ]
        for dtype in ("float64", "float32"):
            t = per_dtype.get(dtype)
            if t is None:
                cells.append("not run")
                continue
            worst = [v for v in t.get("worst_rel_error", {}).values() if finite(v)]
            status = "" if t.get("passed") else " FAILED"
            cells.append((err(max(worst)) if worst else "n/a") + status)
        rows.append(cells)
    return table(
        "trunk | part | input px | tile px | tiles | float64 worst rel. error | float32 worst rel. error",
        rows,
        align="llrrrrr",
    )
