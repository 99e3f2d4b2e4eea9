"""Synthetic slides: tissue texture with small lesions that only full resolution shows.

Layout on disk (what a real slide-level data set would use, e.g. CAMELYON's slides, annotations
and label table)::

    ROOT/labels.csv              slide,label,split    (label 1 = holds lesions; split train/test)
    ROOT/slides/<slide>.png      RGB uint8, full resolution
    ROOT/masks/<slide>.png       uint8 lesion mask (255 = lesion pixel), for evaluation only
    ROOT/slides.json             the generator's spec and seed, labelled "STAND-IN"

NOTE [ Synthetic slides ]
Rule SL1. Texture: hard-edged patches cut from scikit-image's bundled 512² IHC tissue image
          (``skimage.data.immunohistochemistry()``, offline) at random offsets, rotated by a
          multiple of 90° and flipped, then recoloured per slide in stain space (HED: haematoxylin,
          eosin, DAB channels scaled and shifted). Negatives and positives draw from one process.
Rule SL2. A lesion is a cluster of a few small nuclei, each a dark core (σ = 0.8 px) inside a
          pale halo (σ = 2 px): a difference of two unit-mass Gaussians, so every nucleus adds
          zero net intensity. Its energy lies at periods of a few pixels, which area
          downsampling by 4x or more averages away (Rule SL5 measures how much is left); the
          texture's own nuclei are larger (~6-10 px) and survive. Masks mark a 2.5 px disk around
          each lesion nucleus.
Rule SL3. Slide i is a pure function of (seed, version, i): any subset regenerates identically,
          in any order.
Rule SL4. A generated folder is reused only when its ``slides.json`` equals the spec asked for;
          otherwise it is rebuilt (in a ``.partial`` folder, renamed when complete).
Rule SL5. ``lesion_visibility`` reports, per downsampling factor, the largest change the lesions
          make to any downsampled pixel, in units of the texture's standard deviation at that
          resolution: the evidence that lesions are invisible at the lowest resolutions.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

STANDIN_LABEL = "STAND-IN"
VERSION = 1
CORE_SIGMA_PX, HALO_SIGMA_PX, MASK_RADIUS_PX = 0.8, 2.0, 2.5


@dataclass(frozen=True)
class SlideSpec:
    """What to generate. ``size_px`` is the full-resolution edge of a square slide."""

    size_px: int = 1024
    n_train: int = 64  # half positive, half negative
    n_test: int = 64
    lesions: tuple[int, int] = (3, 6)  # lesions per positive slide, inclusive range
    nuclei: tuple[int, int] = (5, 9)  # nuclei per lesion, inclusive range
    cluster_sigma_px: float = 5.0
    amplitude: float = 600.0  # grey levels x px²: mass of each Gaussian of a nucleus (Rule SL2)
    patch_px: int = 128
    seed: int = 0
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.size_px % self.patch_px or self.n_train % 2 or self.n_test % 2:
            raise ValueError(
                f"size_px {self.size_px} must be a multiple of patch_px {self.patch_px}, and "
                f"n_train {self.n_train} / n_test {self.n_test} even (half positive)"
            )


@dataclass(frozen=True)
class Slide:
    name: str
    label: int
    split: str


def tissue_image() -> np.ndarray:
    """scikit-image's bundled IHC image, 512 x 512 x 3 uint8 (no download)."""
    from skimage import data

    return np.asarray(data.immunohistochemistry())


def slide_table(spec: SlideSpec) -> list[Slide]:
    """Every slide's name, label and split; labels alternate so each split is half positive."""
    rows = []
    for i in range(spec.n_train + spec.n_test):
        split = "train" if i < spec.n_train else "test"
        rows.append(Slide(f"slide_{i:04d}", i % 2, split))
    return rows


def _texture(rng: np.random.Generator, spec: SlideSpec, tissue: np.ndarray) -> np.ndarray:
    """Rule SL1: patches of the IHC image, rotated and flipped, recoloured in HED space."""
    from skimage import color

    p, n = spec.patch_px, spec.size_px // spec.patch_px
    out = np.empty((spec.size_px, spec.size_px, 3), np.uint8)
    for r in range(n):
        for c in range(n):
            y, x = (
                rng.integers(0, tissue.shape[0] - p + 1),
                rng.integers(0, tissue.shape[1] - p + 1),
            )
            patch = np.rot90(tissue[y : y + p, x : x + p], k=int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            out[r * p : (r + 1) * p, c * p : (c + 1) * p] = patch
    hed = color.rgb2hed(out)
    hed = hed * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-0.01, 0.01, size=3)
    rgb = color.hed2rgb(hed)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def _lesion_field(
    rng: np.random.Generator, spec: SlideSpec
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """Rule SL2: the added intensity (float, zero net mass per nucleus) and the lesion mask."""
    size = spec.size_px
    field = np.zeros((size, size), np.float64)
    mask = np.zeros((size, size), bool)
    centres: list[tuple[float, float]] = []
    margin = 4 * spec.cluster_sigma_px + 8
    for _ in range(int(rng.integers(spec.lesions[0], spec.lesions[1] + 1))):
        cy, cx = rng.uniform(margin, size - margin, size=2)
        centres.append((float(cy), float(cx)))
        for _ in range(int(rng.integers(spec.nuclei[0], spec.nuclei[1] + 1))):
            ny, nx = np.array([cy, cx]) + rng.normal(0, spec.cluster_sigma_px, size=2)
            y0, x0 = int(ny) - 8, int(nx) - 8
            yy, xx = np.mgrid[y0 : y0 + 17, x0 : x0 + 17]
            d2 = (yy - ny) ** 2 + (xx - nx) ** 2
            g = [
                np.exp(-d2 / (2 * s * s)) / (2 * np.pi * s * s)
                for s in (CORE_SIGMA_PX, HALO_SIGMA_PX)
            ]
            field[y0 : y0 + 17, x0 : x0 + 17] += spec.amplitude * (g[1] - g[0])
            mask[y0 : y0 + 17, x0 : x0 + 17] |= d2 <= MASK_RADIUS_PX**2
    return field, mask, centres


def render_slide(
    index: int, spec: SlideSpec, *, tissue: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slide ``index``: (image HxWx3 uint8, lesion mask HxW bool, clean image without lesions).

    A pure function of (spec, index) (Rule SL3).

    >>> spec = SlideSpec(size_px=256, n_train=2, n_test=2)
    >>> image, mask, clean = render_slide(1, spec)       # odd index: positive
    >>> image.shape, image.dtype, bool(mask.any()), bool((image != clean).any())
    ((256, 256, 3), dtype('uint8'), True, True)
    >>> bool(render_slide(0, spec)[1].any())              # even index: negative, no lesion
    False
    """
    rng = np.random.default_rng([spec.seed, spec.version, index])
    texture = _texture(rng, spec, tissue if tissue is not None else tissue_image())
    if index % 2 == 0:
        return texture, np.zeros(texture.shape[:2], bool), texture
    field, mask, _ = _lesion_field(rng, spec)
    # haematoxylin-dark nuclei: blue channel darkens less than red and green
    tint = np.array([1.0, 1.0, 0.7])
    image = np.clip(np.rint(texture + field[..., None] * tint), 0, 255).astype(np.uint8)
    return image, mask, texture


def _manifest(spec: SlideSpec) -> dict[str, object]:
    import skimage

    return {"label": STANDIN_LABEL, **asdict(spec), "scikit_image": skimage.__version__}


def make_slides(root: Path | str, spec: SlideSpec, *, log: Callable[[str], object] = print) -> Path:
    """Write the slides, masks and label table under ``root`` (reused if the spec matches, SL4)."""
    root = Path(root)
    want = json.loads(json.dumps(_manifest(spec)))
    manifest = root / "slides.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return root
    log(f"generating {STANDIN_LABEL} slides in {root} ({spec})")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "slides").mkdir(parents=True)
    (tmp / "masks").mkdir()
    tissue = tissue_image()
    table = slide_table(spec)
    for i, slide in enumerate(table):
        image, mask, _ = render_slide(i, spec, tissue=tissue)
        Image.fromarray(image).save(tmp / "slides" / f"{slide.name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / f"{slide.name}.png")
    with open(tmp / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "split"])
        writer.writerows((s.name, s.label, s.split) for s in table)
    (tmp / "slides.json").write_text(json.dumps(want, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def read_table(root: Path | str) -> list[Slide]:
    """The label table of a slide folder (``labels.csv``)."""
    with open(Path(root) / "labels.csv", newline="") as f:
        return [Slide(r["slide"], int(r["label"]), r["split"]) for r in csv.DictReader(f)]


def read_slide(root: Path | str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, lesion mask HxW bool) of one slide."""
    root = Path(root)
    image = np.array(Image.open(root / "slides" / f"{name}.png").convert("RGB"))
    mask = np.asarray(Image.open(root / "masks" / f"{name}.png")) > 0
    return image, mask


def downsample(image: np.ndarray, factor: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x H/f x W/f uint8, area (box) averaged and rounded: a pyramid level."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double()
    if factor > 1:
        t = F.avg_pool2d(t, factor)
    return t[0].round().clamp(0, 255).to(torch.uint8)


def lesion_visibility(
    spec: SlideSpec, factors: Sequence[int], *, slides: Iterator[int] | Sequence[int] = (1, 3)
) -> dict[int, float]:
    """Rule SL5: per factor, max |downsampled(lesions) - downsampled(clean)| / texture std.

    Computed in float before rounding to uint8 (what the network could at best see).

    >>> vis = lesion_visibility(SlideSpec(size_px=256, n_train=2, n_test=2), [1, 8], slides=[1])
    >>> vis[1] > 1.0 > 0.25 > vis[8]       # plain to see at full resolution, gone at 1/8
    True
    """
    out: dict[int, float] = {}
    tissue = tissue_image()
    renders = [render_slide(i, spec, tissue=tissue) for i in slides]
    for f in factors:
        worst = 0.0
        for image, _, clean in renders:
            a, b = (
                F.avg_pool2d(torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None], f)
                for x in (image, clean)
            )
            worst = max(worst, float((a - b).abs().max() / b.std()))
        out[f] = worst
    return out
