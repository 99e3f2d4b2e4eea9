"""ImageNette data: the real folder layout, a deterministic stand-in, and seeded batch streams.

Layout (what `--data PATH` / `IMAGENETTE_ROOT` must point at; the fast.ai archive
"imagenette2-320" unpacks to exactly this)::

    PATH/train/n01440764/*.JPEG      one folder per WordNet id, 10 folders
    PATH/val/n01440764/*.JPEG        same 10 folders

The stand-in writes the same layout with random views of real photographs bundled with
scikit-image (each class its own photographs; NOTE [ Photograph stand-in ]), and a
``standin.json`` manifest that labels it "STAND-IN".

NOTE [ Identical data for both runs ]
Rule 1. The epoch order is ``randperm(n)`` from a generator seeded with (seed, epoch).
Rule 2. The augmentation of sample i in epoch e runs under ``torch.random.fork_rng`` seeded with
        (seed, epoch, i), so it does not depend on whatever else drew from torch's global
        generator before it (the other run, a test).
Rule 3. Each run owns its own `BatchStream`; the training loop checks the two streams' batches
        are bitwise equal at every step, so "same data" is verified, not assumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

# The 10 ImageNette classes, sorted (= torchvision ImageFolder's class index order).
WNIDS: tuple[str, ...] = (
    "n01440764",  # tench
    "n02102040",  # English springer
    "n02979186",  # cassette player
    "n03000684",  # chain saw
    "n03028079",  # church
    "n03394916",  # French horn
    "n03417042",  # garbage truck
    "n03425413",  # gas pump
    "n03445777",  # golf ball
    "n03888257",  # parachute
)
CLASS_NAMES: tuple[str, ...] = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
STANDIN_LABEL = "STAND-IN"
# ImageNet channel statistics; the paper does not say how it normalised, the reference notebook
# used these.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Sub-folder names the fast.ai archives unpack to; `--data` may point at their parent.
ARCHIVE_DIRS = ("imagenette2-320", "imagenette2", "imagenette-320", "imagenette2-160")


class DataLayoutError(Exception):
    """The data folder is missing or not in ImageNette layout; the message says what to do."""


def layout_help(root: Path | str) -> str:
    lines = [
        f"ImageNette data not found at {root}.",
        "Nothing is downloaded at run time. Put the ImageNette images (e.g. the fast.ai",
        "'imagenette2-320' archive, unpacked) so that this layout exists:",
        f"    {root}/train/<wnid>/*.JPEG",
        f"    {root}/val/<wnid>/*.JPEG",
        "with one folder per WordNet id, all 10 of them in both train/ and val/:",
    ]
    lines += [f"    {w}  {n}" for w, n in zip(WNIDS, CLASS_NAMES, strict=True)]
    lines += [
        "then run:  python -m suites.imagenette --data PATH   (or set IMAGENETTE_ROOT=PATH).",
        "Without --data the synthetic STAND-IN data set is generated and used instead.",
    ]
    return "\n".join(lines)


def resolve_root(root: Path | str) -> Path:
    """Return the folder holding train/ and val/, or raise DataLayoutError saying what is missing."""
    root = Path(root).expanduser()
    if root.is_dir() and not (root / "train").is_dir():
        for sub in ARCHIVE_DIRS:  # accept the parent of an unpacked archive
            if (root / sub / "train").is_dir():
                root = root / sub
                break
    problems = []
    if not root.is_dir():
        problems.append(f"{root} is not a directory")
    else:
        for split in ("train", "val"):
            d = root / split
            if not d.is_dir():
                problems.append(f"{d} is missing")
                continue
            missing = [w for w in WNIDS if not (d / w).is_dir()]
            if missing:
                problems.append(f"{d} lacks class folders {', '.join(missing)}")
            elif not any(any((d / w).iterdir()) for w in WNIDS):
                problems.append(f"{d} class folders are empty")
    if problems:
        raise DataLayoutError(layout_help(root) + "\nProblem: " + "; ".join(problems) + ".")
    return root


def train_transform(image_size: int) -> transforms.Compose:
    # Paper 5.1: crops of 8-100 % of the area, aspect ratio in [3/4, 4/3] (Szegedy et al.).
    # No horizontal flip: the paper does not mention one.
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def eval_transform(image_size: int) -> transforms.Compose:
    # Paper 5.1: "320 x 320 patches from the center of the image".
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def _only_wnids(directory: str) -> tuple[list[str], dict[str, int]]:
    return list(WNIDS), {w: i for i, w in enumerate(WNIDS)}


class _ImagenetteFolder(datasets.ImageFolder):
    """ImageFolder restricted to the 10 wnids (extra folders are ignored, order = WNIDS)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return _only_wnids(directory)


def load_split(root: Path | str, split: str) -> datasets.ImageFolder:
    """The raw (PIL, untransformed) split; labels index WNIDS."""
    return _ImagenetteFolder(str(Path(root) / split))


def _mix(*ints: int) -> int:
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint32)[0])


class BatchStream:
    """Mini-batches of one epoch, a pure function of (seed, epoch): see NOTE [ Identical data ]."""

    def __init__(
        self,
        dataset: datasets.ImageFolder,
        transform,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        augment_seeded: bool,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.augment_seeded = augment_seeded

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _item(self, epoch: int, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.dataset[i]
        if not self.augment_seeded:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):  # Rule 2
            torch.manual_seed(_mix(self.seed, epoch, i))
            return self.transform(img), label

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        if self.shuffle:  # Rule 1
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch))
            )
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            items = [self._item(epoch, int(i)) for i in order[start : start + self.batch_size]]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------------------
# Stand-in generator
# ---------------------------------------------------------------------------------------------

# NOTE [ Photograph stand-in ]
# Rule S1. Every image is a view of real photographs that scikit-image ships inside its wheel
#          (skimage/data/*.png, *.jpg); functions of skimage.data that fetch files through pooch
#          are not used, so the stand-in is made offline. Each class has its own photographs.
# Rule S2. A view is a random crop (15-70 % of the photograph's area, aspect 3/4-4/3), resized to
#          `size_px`, flipped left-right with probability 1/2, colour-jittered (brightness,
#          contrast, saturation x0.6-1.4, hue +-0.08 turns), turned grey with probability 1/4,
#          plus pixel noise: colour and brightness alone do not give the class away, and no two
#          images are the same view. Tuning images are other random views of the same photographs
#          (not held-out photographs): the tuning accuracy measures recognising new views.
# Rule S3. Every random number comes from numpy's generator seeded with (seed, version, split,
#          class, index): the data set is a pure function of `StandinSpec`, bit for bit.

STANDIN_VERSION = 2
# One entry per class (index = position in WNIDS): the skimage.data photographs it is drawn from.
STANDIN_PHOTOS: tuple[tuple[str, ...], ...] = (
    ("astronaut",),
    ("chelsea",),
    ("coffee",),
    ("rocket",),
    ("hubble_deep_field",),
    ("retina",),
    ("immunohistochemistry",),
    ("motorcycle_left", "motorcycle_right"),
    ("camera", "moon", "coins"),
    ("brick", "grass", "gravel"),
)


@dataclass(frozen=True)
class StandinSpec:
    train_per_class: int = 40
    val_per_class: int = 10
    size_px: int = 352
    seed: int = 0
    version: int = STANDIN_VERSION


def standin_photo(name: str) -> Image.Image:
    """One bundled skimage.data photograph as RGB (Rule S1: read from the wheel, never fetched).

    >>> standin_photo("coffee").size      # coffee.png is 600 x 400 px
    (600, 400)
    """
    from skimage import data as skdata

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skdata.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    else:
        array = getattr(skdata, name)()
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return Image.fromarray(array[..., :3].astype(np.uint8), "RGB")


def _view(photo: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """One random view of `photo` (Rule S2)."""
    from torchvision.transforms import functional as F

    w, h = photo.size
    area = rng.uniform(0.15, 0.7) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(area * aspect)))
    ch = min(h, round(math.sqrt(area / aspect)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    brightness, contrast, saturation = rng.uniform(0.6, 1.4, 3)
    img = F.adjust_brightness(img, float(brightness))
    img = F.adjust_contrast(img, float(contrast))
    img = F.adjust_saturation(img, float(saturation))
    img = F.adjust_hue(img, float(rng.uniform(-0.08, 0.08)))
    if rng.random() < 0.25:
        img = img.convert("L").convert("RGB")
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def standin_image(
    class_index: int,
    split: str,
    index: int,
    spec: StandinSpec,
    *,
    photos: dict[str, Image.Image] | None = None,
) -> Image.Image:
    """Image `index` of class `class_index` in `split`: a pure function of its arguments (Rule S3)."""
    rng = np.random.default_rng(
        [spec.seed, spec.version, {"train": 0, "val": 1}[split], class_index, index]
    )
    names = STANDIN_PHOTOS[class_index]
    name = names[int(rng.integers(len(names)))]
    photo = photos[name] if photos is not None else standin_photo(name)
    return _view(photo, rng, spec.size_px)


def make_standin(root: Path | str, spec: StandinSpec = StandinSpec(), *, log=print) -> Path:
    """Write the stand-in in ImageNette layout under `root` (reused if the manifest matches)."""
    import PIL
    import skimage
    import torchvision

    root = Path(root)
    manifest = root / "standin.json"
    want = {  # everything the bytes depend on: reused only if all of it matches
        "label": STANDIN_LABEL,
        **asdict(spec),
        "scikit_image": skimage.__version__,  # the photographs
        "pillow": PIL.__version__,  # resizing, colour jitter, JPEG encoding
        "torchvision": torchvision.__version__,  # adjust_hue and friends
        "photographs": {w: list(p) for w, p in zip(WNIDS, STANDIN_PHOTOS, strict=True)},
    }

    def ready() -> bool:
        return manifest.is_file() and json.loads(manifest.read_text()) == want

    if ready():
        return root
    log(f"generating {STANDIN_LABEL} data set in {root} ({spec})")
    photos = {n: standin_photo(n) for names in STANDIN_PHOTOS for n in names}
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")  # two runs may generate at once
    shutil.rmtree(tmp, ignore_errors=True)
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for c, wnid in enumerate(WNIDS):
            d = tmp / split / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                img = standin_image(c, split, i, spec, photos=photos)
                img.save(d / f"{wnid}_{i:04d}.JPEG", quality=90)
    (tmp / "standin.json").write_text(json.dumps(want, indent=1))
    if ready():  # another process finished first, with the same bytes (Rule S3): keep its copy
        shutil.rmtree(tmp)
        return root
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def is_standin(root: Path | str) -> bool:
    manifest = Path(root) / "standin.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("label") == STANDIN_LABEL


def data_root_from(arg: str | None) -> Path | None:
    """`--data` if given, else $IMAGENETTE_ROOT, else None (meaning: use the stand-in)."""
    value = arg if arg is not None else os.environ.get("IMAGENETTE_ROOT") or None
    return Path(value) if value is not None else None
