"""The zoo suite (``python -m suites.zoo``) on a quick subset: one exact trunk, one legitimately
refused trunk, the refusal classes and the summary written from the rows alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import streamcheck
from streamcheck.errors import Problem
from suites.zoo.models import ZooModel, zoo
from suites.zoo.run import (
    check_model,
    check_split,
    check_whole,
    problem_layers,
    reclassify,
    refusal_class,
    refused_layers,
    whole_input_and_tile,
)
from suites.zoo.summary import (
    counts,
    latest,
    split_counts,
    train_counts,
    whole_counts,
    write_summary,
)

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


def test_an_se_trunk_streams_its_statistics_and_attention_is_a_legitimate_refusal(
    tmp_path: Path,
) -> None:
    exact = check_model(by_name("torchvision.regnet_y_400mf"))  # squeeze-excite in every block
    assert exact["status"] == "exact", exact
    assert exact["worst_rel_error"] <= 1e-10 and exact["n_tiles"] >= 4
    assert exact["levels"] >= 1 and exact["passes_inference"] == exact["levels"] + 1
    swin = check_model(by_name("torchvision.swin_t"))
    assert swin["status"] == "refused" and swin["refusal"] == "non-local", swin
    assert swin["layers"][0]["path"].startswith("1.0.attn")
    results = tmp_path / "results.jsonl"
    rows = [
        exact | {"command": "test", "environment": {}},
        swin | {"command": "test", "environment": {}},
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
    se = check_split(by_name("timm.seresnet18"))  # squeeze-excite streams (split Rule SP8)
    assert se["status"] == "equal" and se["cut"] == "layer4" and not se["early"], se
    assert se["stopped_by"][0]["path"] == "global_pool.pool"
    rows = [{"name": "timm.seresnet18", "status": "exact", "split": se}]
    assert split_counts(rows)["head(trunk(x)) == model(x)"] == 1
    assert split_counts(rows)["ends early"] == 0


def _toy(name: str, build):  # type: ignore[no-untyped-def]
    return ZooModel(name, "torchvision", "toy", "exact", build)


def _bn_chain(n: int) -> nn.Module:
    """``n`` conv + BatchNorm + ReLU blocks: ``n`` statistic levels in training mode."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    for _ in range(n):
        layers += [nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)]
    return nn.Sequential(*layers)


def test_train_mode_is_exact_with_running_statistics_or_refused_by_budget(tmp_path: Path) -> None:
    exact = check_model(_toy("toy.bn2", lambda: _bn_chain(2)), mode="train")
    assert exact["status"] == "exact", exact
    assert exact["levels"] == 2 and exact["passes_training"] == 6  # 2 * (2 levels + output)
    assert exact["n_tiles"] >= 4 and exact["worst_rel_error"] <= 1e-10
    deep = check_model(_toy("toy.bn17", lambda: _bn_chain(17)), mode="train")
    assert deep["status"] == "budget" and deep["levels"] == 17 > deep["max_levels"], deep
    assert "input_shape" not in deep  # a plan only
    # Rule Z13: eval and train rows of one model are two keys; rows without a mode are eval rows
    results = tmp_path / "results.jsonl"
    old = {"name": "toy.bn2", "status": "exact", "worst_rel_error": 0.0, "n_tiles": 4}
    rows = [old, exact, deep]
    results.write_text(
        "".join(json.dumps(r | {"command": "t", "environment": {}}) + "\n" for r in rows)
    )
    assert [r["name"] for r in latest(results, mode="eval")] == ["toy.bn2"]
    assert [r["status"] for r in latest(results, mode="train")] == ["exact", "budget"]
    assert train_counts(latest(results, mode="train"))["budget"] == 1
    write_summary(results, tmp_path / "SUMMARY.md")
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "exact: **1** | budget: **1**" in text and "| toy.bn17 | 17 | 36 / 18 |" in text


class _PooledNorm(nn.Module):
    """A BatchNorm on pooled features (ResNeSt's, SKNet's attention): PyTorch needs 2 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * torch.sigmoid(self.norm(y.mean((2, 3), keepdim=True)))


def test_train_mode_takes_two_images_where_pytorch_needs_two_values_per_channel() -> None:
    torch.manual_seed(0)
    row = check_model(_toy("toy.pooled_norm", _PooledNorm), mode="train")
    assert row["status"] == "exact" and row["input_shape"][0] == 2, row


class _Classifier(nn.Module):
    """A toy classifier: conv, squeeze-excite, conv, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.se = nn.Conv2d(4, 4, 1)
        self.last = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = self.last(y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True))))
        return self.fc(y.mean((2, 3)))


def test_a_whole_classifier_streams_to_its_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr("suites.zoo.run.classifier", lambda model: _Classifier())
    whole = check_whole(_toy("toy.classifier", _Classifier))
    assert whole["status"] == "equal" and whole["rel_error"] <= 1e-10, whole
    assert whole["levels"] == 2 and whole["passes_inference"] == 2  # SE, then the pool
    assert whole["logits_shape"] == [1, 5] and min(whole["n_tiles"]) >= 2
    rows = [{"name": "toy.classifier", "status": "exact", "whole": whole}]
    assert whole_counts(rows) == {
        "classifiers": 1, "equal": 1, "different": 0, "refused": 0, "crash": 0,
    }  # fmt: skip


class _Video(nn.Module):
    """A toy video classifier that reaches 163 frames (more than a 64-frame probe): a 3x3x3 conv
    of stride 2, then a conv of 3 frames dilated by 40 (163 = 3 + 2 * 40 * 2), a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, stride=2, padding=1)
        self.time = nn.Conv3d(4, 4, (3, 1, 1), dilation=(40, 1, 1), padding=(40, 0, 0))
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.time(torch.relu(self.conv(x))).mean((2, 3, 4)))


def test_a_video_classifier_gets_tiles_that_hold_its_reach_on_every_axis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr("suites.zoo.run.classifier", lambda model: _Video())
    model = ZooModel("toy.video", "torchvision", "toy", "exact", _Video, spatial_axes=3)
    field, stride = (163, 3, 3), (2, 2, 2)  # by hand, from the layers above
    shape, tile = whole_input_and_tile(model, _Video().double())
    assert all(t >= f for t, f in zip(tile, field, strict=True)), (shape, tile)
    # time streams: the image holds the tile, which owns 81 of the 162 output frames
    assert shape[2] >= tile[0] and (tile[0] - field[0]) // stride[0] + 1 == shape[2] // 2 // 2
    # the other axes are one tile: it reaches every output's field, 4 outputs of 2 px each
    assert shape[3:] == (8, 8) and tile[1:] == (3 + 3 * 2, 3 + 3 * 2)
    whole = check_whole(model)
    assert whole["status"] == "equal" and whole["rel_error"] <= 1e-10, whole
    assert whole["n_tiles"] == [2] and whole["input_shape"] == list(shape), whole


def test_refusals_are_read_from_the_problems_and_the_budget_is_its_own_class() -> None:
    error = streamcheck.StreamcheckError(
        "x", problems=[Problem("se (expand_as)", ".expand_as() is not a method", "move it")]
    )
    assert problem_layers(error, name="") == [
        {"path": "se (expand_as)", "reason": ".expand_as() is not a method", "kind": "gap"}
    ]
    budget = streamcheck.StreamcheckError(
        "streamcheck: this module has 17 levels of statistics over space that depend on each "
        "other (...)\nmore"
    )
    layers = problem_layers(budget, name="")
    assert layers[0]["path"] == "" and refusal_class(layers) == "budget"
