"""Tests of the ``streamcheck`` command, run in-process on ``examples/my_models.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import streamcheck
from streamcheck.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--input", "1x3x96x96", "--tile", "48"]


@pytest.fixture(autouse=True)
def _in_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command puts the current directory on sys.path; run it from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT))])


def test_plan_prints_the_engines_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "examples.my_models:trunk", *SMALL]) == 0
    out = capsys.readouterr().out
    from examples.my_models import trunk

    assert out.strip() == str(streamcheck.plan(trunk(), (1, 3, 96, 96), tile=48)).strip()


def test_verify_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", "examples.my_models:trunk", *SMALL, "--head", "examples.my_models:head"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "PASSED" in captured.out
    assert "head.2.weight" in captured.out
    assert "max rel err" in captured.out


def test_verify_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify", "examples.my_models:paper_fig2", "--input", "1x3x64x80", "--tile", "32x40"]
    assert main([*args, "--json", "--dtype", "float32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True
    assert data["dtype"] == "float32"
    assert data["tile"] == [32, 40]
    assert data["input_shape"] == [1, 3, 64, 80]
    assert data["n_tiles"] >= 4
    names = [row["name"] for row in data["rows"]]
    assert names[:2] == ["output", "input.grad"]
    assert {"0.weight", "0.bias", "2.weight", "4.weight", "4.bias"} <= set(names)


def test_verify_a_file_path_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "examples/my_models.py:trunk", *SMALL]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_not_equivalent_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class DroppedPixel(streamcheck.Streamed):  # type: ignore[misc, name-defined]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            keep = torch.ones_like(y)
            keep[..., 0, -1] = 0
            return y * keep

    monkeypatch.setattr(streamcheck, "Streamed", DroppedPixel)
    assert main(["verify", "examples.my_models:trunk", *SMALL]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "FAIL" in out.splitlines()[3]  # the output row


def test_unstreamable_model_exits_2_naming_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", "examples.my_models:row_gate", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert "'1 (mean)'" in err  # the gate's mean, by its path in the Sequential
    assert "Traceback" not in err
    assert main(["plan", "examples.my_models:row_gate", *SMALL]) == 2


def test_a_train_mode_batchnorm_verifies_and_plans_its_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verify", "examples.my_models:batchnorm_in_training", *SMALL]) == 0
    assert main(["plan", "examples.my_models:batchnorm_in_training", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "statistic levels" in out and "4 training, 2 inference" in out


def test_tile_below_the_receptive_field_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "examples.my_models:trunk", "--input", "1x3x96x96", "--tile", "8"]) == 2
    assert "receptive field" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify", "examples.my_models:nope", *SMALL], "has no attribute 'nope'"),
        (["verify", "examples.nothing_here:f", *SMALL], "cannot import 'examples.nothing_here'"),
        (["verify", "examples.my_models", *SMALL], "PKG.MODULE:FACTORY"),
        (["verify", "examples.my_models:not_a_module", *SMALL], "not a torch.nn.Module"),
        (["plan", "examples.my_models:trunk", "--input", "3x96x96x", "--tile", "48"], "--input"),
        (["plan", "examples.my_models:trunk", "--input", "1x3x96x96", "--tile", "0"], "--tile"),
        (["plan", "examples.my_models:trunk", "--input", "96x96", "--tile", "48"], "--input"),
        (["verify", "examples.my_models:trunk", *SMALL, "--dtype", "float16"], "--dtype"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message without CUDA")
def test_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "examples.my_models:trunk", *SMALL, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify", "examples.my_models:trunk", *SMALL, "--device", "cuda", "--dtype", "float32"]
    assert main(args) == 0, capsys.readouterr().out


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--help"]) == 0
    assert "--head" in capsys.readouterr().out


def test_plan_until_plans_the_trunk_split_cuts(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torchvision")
    args = ["torchvision.models:resnet18", "--input", "1x3x256x256", "--tile", "128"]
    assert main(["plan", *args, "--until", "layer2"]) == 0
    out = capsys.readouterr().out
    from torchvision.models import resnet18

    cut = streamcheck.split(resnet18().eval(), until="layer2", input_shape=(1, 3, 256, 256))
    assert out.startswith("split after 'layer2' (total stride 8 x 8; planned in eval mode)\n")
    assert "trunk  conv1, bn1, relu, maxpool, layer1, layer2 (0.68 M parameters)" in out
    assert "head   layer3, layer4, avgpool, flatten(), fc (11.01 M parameters)" in out
    assert out.endswith(str(streamcheck.plan(cut.trunk, (1, 3, 256, 256), tile=128)) + "\n")
    assert main(["plan", *args, "--stride", "8"]) == 0
    assert capsys.readouterr().out == out


def test_plan_split_says_what_stopped_the_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    args = ["timm.models:seresnet18", "--input", "1x3x128x128", "--tile", "64", "--split"]
    assert main(["plan", *args]) == 0
    captured = capsys.readouterr()
    # squeeze-excite streams (two statistic levels in layer1); the 64 px tile stops the prefix
    assert captured.out.startswith("split after 'layer1' (total stride 4 x 4")
    assert "statistic levels             2" in captured.out
    assert "stopped: the prefix up to 'layer2.0' is refused" in captured.err
    assert "receptive field" in captured.err


def test_plan_until_an_unknown_module_lists_the_cuts(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torchvision")
    args = ["torchvision.models:resnet18", "--input", "1x3x64x64", "--tile", "64"]
    assert main(["plan", *args, "--until", "layer9"]) == 2
    assert "no module 'layer9'; it can be cut after: conv1, bn1" in capsys.readouterr().err
    assert main(["plan", *args, "--until", "layer1", "--stride", "4"]) == 2  # one or the other
