"""Background skipping (streamcheck/masks.py, streaming Rule S9): the mask contract, skipped tiles,
zero-gradient tiles, inf/NaN, bad masks, and the tissue-mask helper."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from streamcheck import StreamcheckError, Streamed, open_image, tissue_mask
from streamcheck.masks import ScaledMask
from streamcheck.testing import relative_error

F64_RTOL = 1e-10


def trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1)
    ).double()


class Counting:
    """A tile_transform that counts the tiles it sees (one per tile and pass)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return t.double()


def image(h: int = 96, w: int = 80) -> torch.Tensor:
    return torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def weights_like(y: torch.Tensor) -> torch.Tensor:
    return torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- mask geometry


@given(
    mask_shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    scale=st.integers(1, 7),
    data=st.data(),
)
def test_a_box_touches_the_mask_pixels_whose_area_it_overlaps(mask_shape, scale, data) -> None:
    """Oracle: mask pixel i covers the real interval [i H/h, (i+1) H/h) (Rule T1), by fractions."""
    h, w = mask_shape
    H, W = (n * scale + data.draw(st.integers(0, scale - 1)) for n in (h, w))
    assume(abs(h - H * w / W) <= 1 and abs(w - W * h / H) <= 1)  # Rule T1's aspect ratio
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(
        h, w
    )
    y0 = data.draw(st.integers(0, H - 1))
    y1 = data.draw(st.integers(y0 + 1, H))
    x0 = data.draw(st.integers(0, W - 1))
    x1 = data.draw(st.integers(x0 + 1, W))

    def overlaps(i: int, m: int, n: int, a: int, b: int) -> bool:
        return Fraction(i * n, m) < b and Fraction((i + 1) * n, m) > a

    want = any(
        bool(mask[i, j]) and overlaps(i, h, H, y0, y1) and overlaps(j, w, W, x0, x1)
        for i in range(h)
        for j in range(w)
    )
    assert ScaledMask(mask, (H, W)).touches(((y0, y1), (x0, x1))) == want


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            torch.ones(10, 20, dtype=torch.bool),
            r"mask 10 x 20 does not have the aspect ratio of the image 96 x 80",
        ),
        (torch.ones(12, 10), r"boolean, got torch\.float32.*mask > 0"),
        (torch.ones(1, 1, 1, 12, 10, dtype=torch.bool), r"5 axes; the image has 2 spatial axes"),
        (torch.ones(1, 3, 12, 10, dtype=torch.bool), r"3 channels; a per-image mask is"),
        (
            [torch.ones(12, 10, dtype=torch.bool), torch.ones(10, 3, dtype=torch.bool)],
            "2 per-image masks for a batch of 1",
        ),
        ("tissue", r"boolean tensor or NumPy array, got builtins\.str"),
    ],
    ids=["aspect", "dtype", "axes", "channels", "per-image aspect", "type"],
)
def test_bad_masks_are_refused_before_any_tile(mask, message) -> None:
    counting = Counting()
    with pytest.raises(StreamcheckError, match=message):
        Streamed(trunk(), tile=32, tile_transform=counting)(image(), mask=mask)
    assert counting.calls == 0


# ------------------------------------------------------------------------------ the contract


def tissue(h: int = 12, w: int = 10) -> torch.Tensor:
    """A thumbnail mask (1/8 of the image) with tissue in one corner and one blob."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:3, :2] = True
    mask[8:10, 7:9] = True
    return mask


@pytest.mark.parametrize("as_numpy", [False, True])
def test_masked_streaming_equals_the_plain_model_times_the_computed_region(as_numpy: bool) -> None:
    """Rule T3: output, parameter gradients and input gradient of plain(x) * computed_region."""
    x = image().requires_grad_()
    mask = tissue().numpy() if as_numpy else tissue()
    module = trunk()
    streamed = Streamed(module, tile=32)
    region = streamed.computed_region(x, mask=mask)
    y = streamed(x, mask=mask)
    assert 0 < region.sum() < region.numel()  # some tiles skipped, some computed
    (y * weights_like(y)).sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in module.parameters())]
    x.grad = None
    module.zero_grad()
    plain = module(x) * region
    assert relative_error(y.detach(), plain.detach()) < F64_RTOL
    assert torch.all(y[~region.expand_as(y)] == 0)  # skipped tiles own zeros
    (plain * weights_like(plain)).sum().backward()
    want = [x.grad, *(p.grad for p in module.parameters())]
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < F64_RTOL


def test_skipped_tiles_are_neither_read_nor_computed_in_forward_or_backward() -> None:
    streamed = Streamed(trunk(), tile=32, tile_transform=(counting := Counting()))
    x = image()
    plan = streamed.plan(x.shape)
    region = streamed.computed_region(x, mask=tissue())
    kept = sum(
        bool(region[0, 0][tuple(slice(a, b) for a, b in t.output_box)].any()) for t in plan.tiles
    )
    assert 0 < kept < plan.n_tiles
    y = streamed(x, mask=tissue())
    assert counting.calls == kept
    (y * weights_like(y)).sum().backward()
    assert counting.calls == 2 * kept


def test_a_mask_without_tissue_gives_zeros_and_no_work() -> None:
    module = trunk()
    streamed = Streamed(module, tile=32, tile_transform=(counting := Counting()))
    y = streamed(image(), mask=torch.zeros(12, 10, dtype=torch.bool))
    assert y.shape == module(image()).shape and y.dtype == torch.float64 and not y.any()
    y.sum().backward()
    assert counting.calls == 0
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())


def test_a_source_with_a_mask_reads_only_the_computed_regions(tmp_path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    source = open_image(pixels)
    reads: list[tuple] = []
    read = source._read
    source._read = lambda rows, cols: reads.append((rows, cols)) or read(rows, cols)  # type: ignore[method-assign]
    streamed = Streamed(trunk(), tile=32, tile_transform=lambda t: t.double() / 255)
    y = streamed(source, mask=tissue())
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
    assert torch.equal(y, streamed(tensor, mask=tissue()))
    region = streamed.computed_region(source, mask=tissue())
    assert len(reads) == sum(
        bool(region[0, 0][tuple(slice(a, b) for a, b in t.output_box)].any())
        for t in streamed.plan(source.shape).tiles
    )


# ------------------------------------------------------------------- zero-gradient tiles (S9)


def test_tiles_whose_output_gradient_is_zero_are_not_recomputed_and_gradients_stay_exact() -> None:
    module = trunk()
    streamed = Streamed(module, tile=32, tile_transform=(counting := Counting()))
    x = image().requires_grad_()
    y = streamed(x)
    n_tiles = counting.calls
    y[..., :10, :10].sum().backward()  # the loss reads the first tile's output only
    assert counting.calls == n_tiles + 1
    got = [x.grad.clone(), *(p.grad.clone() for p in module.parameters())]
    x.grad = None
    module.zero_grad()
    module(x)[..., :10, :10].sum().backward()
    for g, w in zip(got, [x.grad, *(p.grad for p in module.parameters())], strict=True):
        assert relative_error(g, w) < F64_RTOL


def test_a_nan_in_the_output_gradient_is_not_zero_so_its_tile_is_recomputed() -> None:
    streamed = Streamed(trunk(), tile=32, tile_transform=(counting := Counting()))
    y = streamed(image())
    grad = torch.zeros_like(y)
    grad[0, 0, -1, -1] = float("nan")
    y.backward(grad)
    assert counting.calls == streamed.plan(image().shape).n_tiles + 1


def test_inf_activations_in_a_tile_without_gradient_stay_out_of_the_gradients() -> None:
    """Rule S9's one difference: plain backward forms 0 * inf = NaN, streamed skips the tile."""
    module = trunk()
    x = image()
    x[0, 0, -1, -1] = float("inf")  # far from the first tile's receptive field
    loss = lambda y: y[..., :10, :10].sum()  # noqa: E731
    loss(Streamed(module, tile=32)(x)).backward()
    streamed_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    loss(module(x)).backward()
    assert any(p.grad.isnan().any() for p in module.parameters())  # the plain model's NaN
    assert all(g.isfinite().all() for g in streamed_grads)
    module.zero_grad()
    finite = x.clone()
    finite[0, 0, -1, -1] = 0.0
    loss(module(finite)).backward()  # the same loss with the far pixel finite
    for g, p in zip(streamed_grads, module.parameters(), strict=True):
        assert relative_error(g, p.grad) < F64_RTOL


# ------------------------------------------------------------------------------- tissue_mask


def thumbnail(fraction_rows: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    pixels = np.clip(rng.normal(240, 2, (60, 50, 3)), 0, 255).astype(np.uint8)  # grey-white glass
    truth = np.zeros((60, 50), dtype=bool)
    truth[10 : 10 + fraction_rows, 5:30] = True
    stain = np.clip(rng.normal((190, 100, 170), 10, (60, 50, 3)), 0, 255).astype(np.uint8)
    pixels[truth] = stain[truth]
    return pixels, truth


def test_tissue_mask_finds_the_stained_pixels_of_a_thumbnail(tmp_path) -> None:
    tifffile = pytest.importorskip("tifffile")
    pixels, truth = thumbnail()
    assert np.array_equal(tissue_mask(pixels), truth)
    tifffile.imwrite(tmp_path / "thumb.tif", pixels, photometric="rgb", tile=(16, 16))
    assert np.array_equal(tissue_mask(open_image(tmp_path / "thumb.tif", level=-1)), truth)


def test_tissue_mask_of_blank_glass_is_empty_and_a_gray_image_is_refused() -> None:
    blank = np.full((30, 30, 3), 242, dtype=np.uint8)
    assert not tissue_mask(blank).any()
    with pytest.raises(StreamcheckError, match="RGB"):
        tissue_mask(np.zeros((30, 30, 1), dtype=np.uint8))


def test_a_tissue_mask_drives_streaming() -> None:
    pixels, truth = thumbnail()
    full = np.repeat(np.repeat(pixels, 4, axis=0), 4, axis=1)  # the "slide": 240 x 200 px
    source = open_image(full)
    streamed = Streamed(trunk(), tile=64, tile_transform=lambda t: t.double() / 255)
    mask = tissue_mask(pixels)
    region = streamed.computed_region(source, mask=mask)
    assert 0 < region.sum() < region.numel()
    y = streamed(source, mask=mask)
    assert torch.all(y[~region.expand_as(y)] == 0)
