"""The zoo suite (``python -m suites.zoo``) on a quick subset: one exact trunk, one legitimately
refused trunk, the refusal classes and the summary written from the rows alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from suites.zoo.models import zoo
from suites.zoo.run import check_model, check_split, reclassify, refusal_class, refused_layers
from suites.zoo.summary import counts, split_counts, write_summary

pytest.importorskip("timm")
pytest.importorskip("torchvision")


def by_name(name: str):  # type: ignore[no-untyped-def]
    return next(m for m in zoo() if m.name == name)


def test_the_zoo_has_at_least_60_models_across_families_and_3d() -> None:
    models = zoo()
    assert len(models) >= 60
    assert len({m.family for m in models}) >= 20
    assert {m.library for m in models} == {"timm", "torchvision"}
    assert any(m.spatial_axes == 3 for m in models)


def test_a_local_trunk_is_exact_and_an_se_trunk_is_a_legitimate_refusal(tmp_path: Path) -> None:
    exact = check_model(by_name("timm.regnetx_002"))
    assert exact["status"] == "exact", exact
    assert exact["worst_rel_error"] <= 1e-10 and exact["n_tiles"] >= 4
    se = check_model(by_name("timm.seresnet18"))
    assert se["status"] == "refused" and se["refusal"] == "non-local", se
    assert se["layers"][0]["path"].startswith("net.layer1.0.se")
    results = tmp_path / "results.jsonl"
    rows = [
        exact | {"command": "test", "environment": {}},
        se | {"command": "test", "environment": {}},
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_summary(results, tmp_path / "SUMMARY.md")
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "exact: **1**" in text and "refused (non-local): **1**" in text
    assert counts(rows)["wrong"] == 0


def test_a_local_operation_the_engine_refuses_is_a_gap() -> None:
    message = (
        "streamcheck: cannot stream this module exactly; these layers break locality:\n"
        "  - 'body (view)': .view() reshapes spatial axes (shape ...). Fix: only split.\n"
        "  - 'layer1.se (mean)': .mean() reduces over tensor dimension(s) [2, 3], which hold "
        "spatial axes here: a global pooling, which needs the whole image. Fix: move it.\n"
        "  - 'layer1.se (mul)': combines feature maps of different spatial layout or size "
        "((8, 8) and (1, 1)). Fix: only combine maps of equal size."
    )
    layers = refused_layers(message)
    assert [layer["kind"] for layer in layers] == ["gap", "non-local", "after non-local"]
    assert refusal_class(layers) == "gap"  # the first refused layer is local: an engine gap
    assert refusal_class(layers[1:]) == "non-local"  # gaps after a non-local layer do not count
    module_pool = (
        "cannot:\n  - '4.block.2.avgpool': AdaptiveAvgPool2d pools over the whole image. Fix: x.\n"
        "  - '4.block.2 (mul)': combines feature maps of different spatial layout or size. Fix: y."
    )
    assert [layer["kind"] for layer in refused_layers(module_pool)] == [
        "non-local",
        "after non-local",
    ]


def test_a_refusal_read_from_the_code_is_classed_by_the_module_it_names() -> None:
    row = {
        "name": "timm.edgenext_xx_small",
        "status": "refused",
        "refusal": "gap",
        "layers": [
            {"path": "net.stages_1.blocks.1 (reshape)", "reason": ".reshape() reshapes spatial "
             "axes (...): merges or splits them with other dimensions.", "kind": "gap"},
            {"path": "net.stages_1.blocks.1.xca (matmul)", "reason": "matmul() is not a "
             "function streamcheck can prove local.", "kind": "gap"},
        ],
    }  # fmt: skip
    again = reclassify(row)
    assert again["refusal"] == "non-local"
    assert [layer["kind"] for layer in again["layers"]] == ["non-local", "non-local"]
    assert "CrossCovarianceAttn" in again["reading"]
    other = reclassify(row | {"name": "timm.some_other_model"})
    assert other["refusal"] == "gap" and "reading" not in other


def test_split_of_a_zoo_classifier_equals_the_whole_model(tmp_path: Path) -> None:
    split = check_split(by_name("timm.regnetx_002"))
    assert split["status"] == "equal" and split["max_abs_difference"] == 0.0, split
    assert split["cut"] == "final_conv" and split["total_stride"] == [32, 32]
    assert split["stopped_by"][0]["kind"] == "non-local" and not split["early"]
    se = check_split(by_name("timm.seresnet18"))
    assert se["status"] == "equal" and se["cut"] == "maxpool" and se["early"], se
    assert se["stopped_by"][0]["path"] == "layer1.0.se (mean)"
    rows = [{"name": "timm.seresnet18", "status": "exact", "split": se}]
    assert split_counts(rows)["head(trunk(x)) == model(x)"] == 1
    assert split_counts(rows)["ends early"] == 1
