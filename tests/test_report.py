"""The report (``python -m suites.report``) and the summaries it indexes are built only from
result files.

Fixture result files are written in ``tmp_path`` with the real writers where they exist
(``suites.equivalence.record.write_record``, the benchmark's ``Point`` rows, the ImageNette
suite's ``plot_run``) and distinctive values (1.2345e-15, 12.345 s, ...). The tests check that
every suite has its entry, that those values appear, and that every number in the equivalence
summary's tables and the benchmark summary's ratio tables is one of the fixtures' numbers or
computed from them (the answer computed another way: ratios, savings and MiB are recomputed here).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from suites.benchmark.summary import PAPER
from suites.equivalence.record import write_record
from suites.report import limits, render
from suites.report.__main__ import build, main

MiB = 2**20
EQ_COMMAND = "python -m suites.equivalence --examples 7 --seed 7"
BENCH_COMMAND = "python -m suites.benchmark --mode quick"
NO_PEER = "lightstream is not installed (pip install lightstream lightning)"
IMN_COMMAND = "python -m suites.imagenette --epochs 2 --control"


# ------------------------------------------------------------------------------- fixtures
def equivalence_record() -> dict[str, Any]:
    worst = {
        "float64": {"output": 1.2345e-16, "param_grad": 1.2345e-15, "input_grad": 2.3456e-16},
        "float32": {"output": 3.4567e-08, "param_grad": 4.5678e-06, "input_grad": 5.6789e-08},
    }
    cases = [
        {
            "ndim": 2,
            "dtype": dtype,
            "input_shape": [1, 2, 23, 19],
            "tile": 11,
            "n_tiles": 4,
            "passed": True,
            "kinds": ["Conv2d", "Conv2d: stride > 1", "ReLU"],
            "layers": ["Conv2d(2, 3, kernel_size=(3, 3), stride=(2, 2))", "ReLU()"],
            "rtol": 1e-10 if dtype == "float64" else 3.3e-05,
            "worst_rel_error": worst[dtype],
        }
        for dtype in ("float64", "float32")
    ]
    return {
        "schema": "streamcheck.equivalence/1",
        "metadata": {
            "command": EQ_COMMAND,
            "started_utc": "2031-01-02T03:00:00+00:00",
            "finished_utc": "2031-01-02T03:04:05+00:00",
            "wall_s": 41.5,
            "examples_per_dtype": 7,
            "seed": 7,
            "environment": {
                "versions": {
                    "python": "3.99.1",
                    "torch": "9.8.7",
                    "streamcheck": "0.5.4",
                    "hypothesis": "6.1",
                    "torchvision": "0.77.6",
                },  # fmt: skip
                "git_commit": "feedc0de",
                "device": "cpu",
                "cpu": "Fixture CPU",
                "torch_threads": 3,
            },
        },
        "method": {
            "checker": "check_streaming_equivalence",
            "strategy": "streaming_cases",
            "draw_options": {"float64": {"padding_modes": ["zeros"]}},
            "tolerances": {"float64": "rtol 1e-10", "float32": "rtol 8 * eps * sqrt(L)"},
            "excluded": {},
            "draws": {
                "2d-float64": {"single_tile_draws_skipped": 13, "ill_posed_draws_skipped": 0}
            },
        },
        "summary": {
            "networks": {
                "float64": {"1d": 2, "2d": 4, "3d": 1},
                "float32": {"1d": 1, "2d": 5, "3d": 1},
            },
            "worst_rel_error": {
                dtype: {
                    kind: {"max_rel_error": value, "case": i, "rtol": cases[i]["rtol"]}
                    for kind, value in worst[dtype].items()
                }
                for i, dtype in enumerate(("float64", "float32"))
            },
            "tiles_per_case": {
                "float64": {"min": 2, "max": 17, "median": 5},
                "float32": {"min": 3, "max": 19, "median": 6},
            },
            "worst_fraction_of_rtol": {"float64": 1.2345e-05, "float32": 0.0321},
            "layer_kinds": {"Conv2d": 9, "Conv2d: stride > 1": 4, "ReLU": 6},
            "layer_kinds_networks": {"Conv2d": 5, "ReLU": 3},
            "n_cases": 14,
            "n_failed": 0,
        },
        "failures": [],
        "trunks": [
            {
                "name": "ResNet-18",
                "description": "stem + layer1",
                "dtype": dtype,
                "input_shape": [1, 3, 96, 96],
                "tile": 64,
                "n_tiles": 16,
                "passed": True,
                "worst_rel_error": {"output": 6.789e-16 if dtype == "float64" else 7.891e-07},
            }
            for dtype in ("float64", "float32")
        ],  # fmt: skip
        "cases": cases,
    }


def benchmark_rows() -> list[dict[str, Any]]:
    """Rows as the benchmark pipeline writes them (``suites/rows.py`` Rule J1)."""
    from suites.benchmark.grid import Point
    from suites.benchmark.point import new_row

    def row(method: str, px: int, tile: int | None, t: float, alloc: float, rss: float,
            status: str = "ok", **extra: Any) -> dict[str, Any]:  # fmt: skip
        point = Point(name=method, input_px=px, tile_px=tile, suite="input")
        out = new_row(point) | {"status": status, "reason": extra.pop("reason", None)}
        out["environment"] = {"python": "3.99.1", "torch": "9.8.7", "torchvision": "7.6.5",
                              "streamcheck": "0.5.4", "git_commit": "c0ffee1", "device": "cpu",
                              "threads": 2, "cpu": "Fixture CPU", "gpu": None, "load_1min": 0.5}  # fmt: skip
        # what runner.run_points adds to each row
        out["run"] = {
            "command": BENCH_COMMAND,
            "started_utc": "2031-01-02T05:06:07Z",
            "wall_s": 33.5,
        }
        if status == "ok":
            out["metrics"] = dict(time_s_median=t, peak_alloc_bytes=int(alloc * MiB),
                                  rss_delta_bytes=int(rss * MiB))  # fmt: skip
        out["metrics"] |= extra
        return out

    return [
        row("conventional", 1024, None, 3.0123, 301.25, 333.75),
        row("streamcheck", 1024, 512, 4.5678, 41.125, 55.5, n_tiles=9, grad_rel_error=2.5e-07),
        row("conventional", 2048, None, 12.345, 1234.5, 1300.25, grad_rel_error_f64=6.125e-05),
        row(
            "streamcheck",
            2048,
            512,
            17.891,
            87.75,
            111.125,
            n_tiles=25,
            grad_rel_error=3.25e-07,
            grad_rel_error_f64=5.8765e-05,
        ),
        row("streamcheck", 2048, 256, 19.75, 61.5, 80.25, n_tiles=81, grad_rel_error=4.75e-07),
        row("conventional", 4096, None, 0, 0, 0, status="oom", reason="MemoryError"),
        row("streamcheck", 4096, 512, 71.5, 301.5, 350.75, n_tiles=81),
        row("lightstream", 2048, 512, 0, 0, 0, status="skipped", reason=NO_PEER),
        row("conventional_tuned", 2048, None, 6.125, 1200.5, 1250.75),
        row(
            "streamcheck_tuned", 2048, 512, 4.375, 90.25, 150.5, n_tiles=25, grad_rel_error=3.5e-07
        ),
    ]


def write_fixtures(reports: Path) -> None:
    write_record(equivalence_record(), reports / "equivalence")

    from suites.rows import append_row, results_path

    bench = reports / "benchmark"
    # an error row superseded by a later ok row of the same point: the last row wins
    append_row(results_path(bench), {**benchmark_rows()[0], "status": "error", "reason": "x"})
    for row in benchmark_rows():
        append_row(results_path(bench), row)
    _png(bench / "fig2_tile.png")

    imn = reports / "imagenette"
    imn.mkdir(parents=True)
    write_imagenette(imn)
    (imn / "float64").mkdir()
    write_imagenette(imn / "float64", dtype="float64", plots=False)


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([1, 2], [2, 1])
    fig.savefig(path, dpi=40)
    plt.close(fig)


def write_imagenette(folder: Path, *, dtype: str = "float32", plots: bool = True) -> None:
    """The three result files of ``suites.imagenette`` (schema of ``train.py``) and its PNGs."""
    from suites.imagenette.plots import plot_run

    steps = [
        {"step": s, "epoch": 1 + (s > 2), "batch_size": 4, "time_s_conventional": 1.5,
         "loss_conventional": 2.5 - 0.1 * s, "time_s_streaming": 1.75,
         "loss_streaming": 2.5 - 0.1 * s + 1e-7 * s, "loss_abs_diff": 1e-7 * s,
         "loss_rel_diff": 4.5e-08 * s, "loss_rel_diff_reordered": 3.5e-08 * s,
         "loss_abs_diff_reordered": 0.9e-7 * s, "trunk_weight_rel_diff": 1.875e-08 * s,
         "trunk_weight_rel_diff_reordered": 1.625e-08 * s, "head_weight_rel_diff": 1e-8 * s,
         "head_weight_rel_diff_reordered": 1e-8 * s, "trunk_update_rel_conventional": 1e-3,
         "trunk_update_rel_streaming": 1e-3, "head_update_rel_conventional": 1e-3,
         "head_update_rel_streaming": 1e-3}
        for s in range(1, 5)
    ]  # fmt: skip
    epochs = [
        {"epoch": e, "step": 2 * e, "train_loss_conventional": 2.1 - 0.1 * e,
         "train_loss_streaming": 2.1 - 0.1 * e + 2e-7, "train_loss_reordered": 2.1 - 0.1 * e + 1e-7,
         "val_loss_conventional": 2.345678 - 0.1 * (2 - e), "val_loss_streaming": 2.345912 - 0.1 * (2 - e),
         "val_loss_reordered": 2.3457 - 0.1 * (2 - e), "val_acc_conventional": 0.375,
         "val_acc_streaming": 0.375, "val_acc_reordered": 0.4, "val_loss_abs_diff": 0.000234,
         "val_acc_abs_diff": 0.0, "val_loss_abs_diff_reordered": 2.2e-05}
        for e in (1, 2)
    ]  # fmt: skip
    run = {
        "dataset": "STAND-IN", "synthetic": True, "n_train_images": 40, "n_val_images": 20,
        "config": {"epochs": 2, "batch_size": 4, "image_size": 160, "lr": 1e-3, "dtype": dtype},
        "command": IMN_COMMAND, "status": "finished", "epochs_completed": 2,
        "steps_completed": 4, "steps_per_epoch": 2, "finished_utc": "2031-01-02T07:08:09+00:00",
        "environment": {"python": "3.99.1", "torch": "9.8.7", "torchvision": "0.77.6",
                        "streamcheck": "0.5.4", "git_commit": "0ddba11", "device": "cpu",
                        "cpu": "Fixture CPU", "threads": 1},
        "streaming": {"n_tiles_per_image": 49, "tile_px": 32},
    }  # fmt: skip
    for name, rows in (("steps", steps), ("epochs", epochs)):
        with (folder / f"STAND-IN_{name}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (folder / "STAND-IN_run.json").write_text(json.dumps(run))
    if plots:
        plot_run(folder, "STAND-IN")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The fixtures' result files, the equivalence and benchmark summaries written from them by
    their own writers, then the index."""
    from suites.benchmark.summary import write as write_benchmark
    from suites.equivalence.summary import write_summary as write_equivalence

    reports = tmp_path_factory.mktemp("reports")
    write_fixtures(reports)
    write_equivalence(reports / "equivalence")
    write_benchmark(
        reports / "benchmark", rebuild_command="python -m suites.benchmark --plots-only"
    )
    md_path, html_path = build(reports, reports)
    return reports, md_path.read_text(), html_path.read_text()


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def summary(reports: Path, folder: str) -> str:
    return (reports / folder / "SUMMARY.md").read_text()


# --------------------------------------------------------------------------- number provenance
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def leaves(value: Any) -> list[float]:
    """Every number in a JSON-like value, including numbers written inside its strings."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(m) for m in NUMBER.findall(value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in leaves(k) + leaves(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in leaves(v)]
    return []


def derived_benchmark_numbers(rows: list[dict[str, Any]]) -> list[float]:
    """Savings, ratios, MiB, fits: computed here with numpy, independently of the report."""
    import numpy as np

    from suites.rows import flat

    rows = [flat(r) for r in rows]
    ok = {(r["name"], r["input_px"], r["tile_px"]): r for r in rows if r["status"] == "ok"}
    out: list[float] = []
    for r in ok.values():
        out += [r["peak_alloc_bytes"] / MiB, r["rss_delta_bytes"] / MiB]
    conv = {px: r for (m, px, _), r in ok.items() if m == "conventional"}
    stream = {px: r for (m, px, t), r in ok.items() if m == "streamcheck" and t == 512}
    # like with like: each tuned case against the tuned conventional case
    tuned = {px: r for (m, px, _), r in ok.items() if m == "conventional_tuned"}
    for (method, px, _tile), r in ok.items():
        if method == "streamcheck_tuned" and px in tuned:
            for metric in ("time_s_median", "peak_alloc_bytes", "rss_delta_bytes"):
                out.append(r[metric] / tuned[px][metric])
    for (method, px, _tile), r in ok.items():
        if method == "conventional" or px not in conv:
            continue
        out.append(r["time_s_median"] / conv[px]["time_s_median"])
        for meter in ("peak_alloc_bytes", "rss_delta_bytes"):
            out += [r[meter] / conv[px][meter], 100 * (1 - r[meter] / conv[px][meter])]
    # the conventional trend (linear in pixels) where conventional did not run
    for meter in ("peak_alloc_bytes", "rss_delta_bytes"):
        b, a = np.polyfit([px**2 for px in conv], [conv[px][meter] for px in conv], 1)
        for px in set(stream) - set(conv):
            estimate = a + b * px**2
            out += [estimate / MiB, 100 * (1 - stream[px][meter] / estimate)]
    x = np.array([px**2 for px in stream], dtype=float)
    y = np.array([stream[px]["time_s_median"] for px in stream])
    slope = np.polyfit(np.log(x), np.log(y), 1)[0]
    b, a = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - a - b * x) ** 2) / np.sum((y - y.mean()) ** 2)
    return [*out, float(slope), float(r2), float(len(stream))]


def allowed_numbers(reports: Path) -> list[float]:
    record = json.loads((reports / "equivalence" / "record.json").read_text())
    rows = benchmark_rows()
    networks = record["summary"]["networks"]
    counts = [float(sum(v.values())) for v in networks.values()]
    # The paper's published claims (benchmark summary's PAPER) and the figure numbers the text refers to.
    paper = [*leaves(PAPER), 2.0, 3.0, 4.0, 1.0]
    return [*leaves(record), *leaves(rows), *derived_benchmark_numbers(rows), *counts, *paper]


def foreign_numbers(text: str, allowed: list[float]) -> list[str]:
    """Numbers in the bodies of Markdown tables of ``text`` that match no allowed value to the
    printed precision (half a unit in the last printed digit)."""
    foreign = []
    for line in text.splitlines():
        if not line.startswith("| ") or set(line) <= set("|-: "):
            continue
        for token in NUMBER.findall(line):
            mantissa, _, exponent = token.partition("e")
            decimals = len(mantissa.partition(".")[2])
            half_ulp = 0.5 * 10.0 ** (-decimals) * 10.0 ** int(exponent or 0)
            value = float(token)
            if not any(abs(value - a) <= half_ulp * (1 + 1e-9) for a in allowed):
                foreign.append(f"{token} in: {line}")
    return foreign


# ------------------------------------------------------------------------------------ tests
def test_every_suite_has_an_entry_with_its_headline_and_link(built: tuple[Path, str, str]) -> None:
    _, md, html = built
    positions = [md.index(f"## {suite.title}") for suite in render.SUITES]
    assert positions == sorted(positions) and "## Limits" in md
    assert "[`equivalence/SUMMARY.md`](equivalence/SUMMARY.md)" in md
    # the suites without result files in the fixture are said to be not measured (Rule P2)
    assert md.count("**Not measured**") == len(render.SUITES) - 3
    assert "<table>" in html and 'href="benchmark/SUMMARY.md"' in html


def test_fixture_values_appear(built: tuple[Path, str, str]) -> None:
    reports, md, _ = built
    eq = summary(reports, "equivalence")
    for value in ("feedc0de", "9.8.7", "0.77.6", "3.99.1", "Fixture CPU"):
        assert value in eq, value
    for value in ("1.23e-15", "1.23e-16", "4.57e-06", "2-17", "3-19", "2 / 4 / 1", "6.79e-16", "7.89e-07", "13 whose tile"):  # fmt: skip
        assert value in eq, value
    bench = summary(reports, "benchmark")
    claims = section(bench, "## Against the paper's claims")
    saving = 100 * (1 - 87.75 / 1234.5)  # allocator peak at 2048 px, computed here
    assert f"{saving:.1f} % at 2048 px" in claims
    # the time ratios in the like-with-like table (each side named with its settings)
    like = section(bench, "## Like with like")
    defaults = "streamcheck (PyTorch defaults) / conventional (PyTorch defaults)"
    assert f"| {defaults} | {17.891 / 12.345:.2f} |" in like
    tuned = (
        "streamcheck_tuned (channels-last + keep_freed_host_memory()) / conventional_tuned "
        "(channels-last + keep_freed_host_memory())"
    )
    assert f"| {tuned} | {4.375 / 6.125:.2f} |" in like
    train = section(md, "## Training")
    # the run's own reading (suites/imagenette/plots.py), one text for its SUMMARY and the index
    assert "0.375 vs 0.375 after epoch 2" in train
    assert f"per-step losses agree to {4 * 4.5e-08:.1e} relative at worst" in train


def test_numbers_in_equivalence_and_benchmark_tables_come_from_the_fixtures(
    built: tuple[Path, str, str],
) -> None:
    reports, _, _ = built
    allowed = allowed_numbers(reports)
    bench = summary(reports, "benchmark")
    for name, text in (
        ("equivalence", summary(reports, "equivalence")),
        ("like with like", section(bench, "## Like with like")),
        ("paper's claims", section(bench, "## Against the paper's claims")),
    ):
        assert text.count("\n| ") > 5, f"no tables in {name}"
        assert foreign_numbers(text, allowed) == [], name
    # the check itself catches a number that is in no fixture
    assert foreign_numbers("| a | b |\n| --- | --- |\n| x | 4.321 |", allowed) != []


def test_missing_points_and_commands_are_stated_in_the_summaries(
    built: tuple[Path, str, str],
) -> None:
    reports, _, _ = built
    bench = summary(reports, "benchmark")
    assert "`conventional/paper/plain|cpu|float32|4096|-|sum`: oom" in bench
    assert NO_PEER in bench and f"`{BENCH_COMMAND}`" in bench
    assert EQ_COMMAND in summary(reports, "equivalence")


def test_limits_come_from_the_engine(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    text = section(md, "## Limits")
    verdicts = [limits.probe(p) for p in limits.PROBES]
    for verdict in verdicts:  # asked of the engine now, so the report follows it (Rule P4)
        assert f"| {verdict.label} | {verdict.status} |" in text
    assert any(v.status == "refused" for v in verdicts), "a probe the engine refuses"


def test_report_without_any_result_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--reports", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert md.count("**Not measured**") == len(render.SUITES)
    assert "report.html" in capsys.readouterr().out
    assert render.readme_headline(tmp_path) == [
        "- **Exact?** No equivalence record found.",
        "- **Cost?** No benchmark results found.",
    ]


def test_readme_headline_block_is_regenerated_from_the_results(tmp_path: Path) -> None:
    from suites.report.__main__ import README_END, README_START, REPO, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nstale number 123\n{README_END}\noutro\n")
    assert update_readme(readme, REPO / "reports")
    text = readme.read_text()
    assert "stale number 123" not in text
    assert "**Exact?**" in text and "**Cost?**" in text
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\noutro\n")


def test_the_headline_states_each_pair_once_at_the_paper_size(built: tuple[Path, str, str]) -> None:
    reports, md, _ = built
    cost = next(line for line in render.readme_headline(reports) if "**Cost?**" in line)
    assert cost.removeprefix("- ") in md  # the index shows the benchmark summary's headline
    assert cost.startswith("- **Cost?** One training step at 2048², tile 512, streamed / ")
    # the fixture has no streamcheck_defaults row: tuned vs tuned, and best vs best
    tuned = "both channels-last + keep_freed_host_memory(), 4.38 s / 6.12 s"
    assert f"**{4.375 / 6.125:.2f}x** with the same tuned settings ({tuned})" in cost
    assert f"**{4.375 / 6.125:.2f}x** with each side's fastest settings measured ({tuned})" in cost
    assert cost.count("channels-last") == 2  # each ratio names its settings once
    assert f"{100 * 87.75 / 1234.5:.0f} % of conventional's" in cost


def test_every_committed_summary_regenerates_from_its_result_files(tmp_path: Path) -> None:
    """Rule P5: ``summaries.write_all`` on a copy of ``reports/`` rewrites each committed
    SUMMARY.md to the byte (a summary that fell behind its rows or its writer fails here), and
    ``build`` the index REPORT.md."""
    import shutil

    from suites.report import summaries
    from suites.report.__main__ import REPO

    copy = tmp_path / "reports"
    shutil.copytree(REPO / "reports", copy, ignore=shutil.ignore_patterns("*.html"))
    written = summaries.write_all(copy)
    committed = sorted(
        p.relative_to(REPO / "reports") for p in (REPO / "reports").glob("**/*SUMMARY.md")
    )
    assert sorted(p.relative_to(copy) for p in written) == committed
    build(copy, copy)  # the index, from the summaries' headlines
    committed.append(Path("REPORT.md"))
    changed = [p for p in committed if (copy / p).read_text() != (REPO / "reports" / p).read_text()]
    assert not changed, f"{changed}: regenerate with `python -m suites.report` and commit"
