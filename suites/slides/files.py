"""Slide files as scanners and converters write them, generated with tifffile (no downloads).

Rules (slide file layouts), each written JPEG (lossy, what scanners write) or deflate (lossless):

SL1. Aperio-like SVS: page 0 the tiled baseline, its description ``Aperio Image Library ...|
     MPP = ...``; page 1 a stripped thumbnail; then the tiled reduced levels; then the stripped label
     (NewSubfileType 1) and macro (9) images, their descriptions' second line ``label ...`` and
     ``macro ...``, as OpenSlide's Aperio reader and tifffile's SVS series expect.
SL2. A generic pyramid: every level a tiled top-level page, reduced levels marked NewSubfileType 1,
     µm/px as X/YResolution in pixels per centimetre (OpenSlide's generic TIFF; tifffile's levels).
SL3. An OME-TIFF: the reduced levels in SubIFDs of the baseline, µm/px as PhysicalSizeX/Y.
SL4. Level ``k`` is the image sampled every ``2**k`` pixels (exact, so a lossless file's level is
     known without reading it back), and every level is whole tiles, so each level's downsample
     is exactly ``2**k``.
SL5. A DICOM WSI (``write_dicom_slide``, with pydicom): a folder with one VL Whole Slide
     Microscopy instance per level of a file written as above, TILED_FULL, the pixel spacing of
     Rule SL4; a JPEG file's tiles become the instance's frames byte for byte (JPEG Baseline,
     YBR_FULL_422), so a reader decodes the very JPEG streams tifffile decodes; a lossless
     file's tiles are stored uncompressed (Explicit VR Little Endian, RGB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("svs", "generic", "ome")
COMPRESSIONS = ("jpeg", "deflate")
TILE = 32
HEADER = "Aperio Image Library v12.0.15"


def levels_of(image: np.ndarray, count: int) -> list[np.ndarray]:
    """The pyramid written for ``image`` (Rule SL4)."""
    return [np.ascontiguousarray(image[:: 2**k, :: 2**k]) for k in range(count)]


def tissue_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """An HWC uint8 image: pink blobs and texture on white glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.full((height, width, 3), 240, np.int16)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.3) * height
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image[inside] = (200, 100, 170)
    image += rng.integers(-20, 21, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_slide_file(
    path: Path,
    image: np.ndarray,
    *,
    kind: str,
    compression: str,
    mpp: float = 0.25,
    levels: int = 3,
) -> list[np.ndarray]:
    """Write ``image`` (HWC uint8 RGB) as ``kind`` (Rules SL1-SL4); returns the levels written."""
    import tifffile

    if kind not in KINDS or compression not in COMPRESSIONS:
        raise ValueError(f"kind {kind!r} / compression {compression!r}")
    step = TILE * 2 ** (levels - 1)
    if image.shape[0] % step or image.shape[1] % step:
        raise ValueError(f"image {image.shape[:2]} is not whole tiles at level {levels - 1}")
    pyramid = levels_of(image, levels)
    codec: dict[str, Any] = {"compression": "zlib"}
    if compression == "jpeg":
        codec = {"compression": "jpeg", "compressionargs": {"level": 90}}
    # metadata=None: no tifffile "shaped" description, which would hide the vendor layout
    tiled = {"tile": (TILE, TILE), "photometric": "rgb", "metadata": None, **codec}
    h, w = image.shape[:2]
    per_cm = 1e4 / mpp  # pixels per centimetre at level 0
    with tifffile.TiffWriter(path, bigtiff=kind == "ome", ome=kind == "ome") as tw:
        if kind == "svs":
            codec_name = "JPEG/RGB Q=90" if compression == "jpeg" else "Deflate/RGB"
            tw.write(
                pyramid[0],
                description=f"{HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) {codec_name}"
                f"|AppMag = {10 / mpp:g}|MPP = {mpp}",
                **tiled,
            )
            thumb = np.ascontiguousarray(image[::8, ::8])
            tw.write(
                thumb,
                photometric="rgb",
                metadata=None,
                **codec,
                description=f"{HEADER} \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - "
                f"|AppMag = {10 / mpp:g}|MPP = {mpp}",
            )
            for level in pyramid[1:]:
                tw.write(
                    level,
                    description=f"{HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) -> "
                    f"{level.shape[1]}x{level.shape[0]} {codec_name}",
                    **tiled,
                )
            for name, subfiletype, size in (("label", 1, (48, 40)), ("macro", 9, (40, 120))):
                associated = np.full((*size, 3), 200 if name == "label" else 90, np.uint8)
                tw.write(
                    associated,
                    photometric="rgb",
                    metadata=None,
                    compression="zlib",
                    subfiletype=subfiletype,
                    description=f"{HEADER}\r\n{name} {size[1]}x{size[0]}",
                )
        elif kind == "generic":
            for k, level in enumerate(pyramid):
                tw.write(
                    level,
                    subfiletype=1 if k else 0,
                    resolution=(per_cm / 2**k, per_cm / 2**k),
                    resolutionunit="CENTIMETER",
                    **tiled,
                )
        else:
            tw.write(
                pyramid[0],
                subifds=levels - 1,
                **{
                    **tiled,
                    "metadata": {
                        "axes": "YXS",
                        "PhysicalSizeX": mpp,
                        "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": mpp,
                        "PhysicalSizeYUnit": "µm",
                    },
                },
            )
            for level in pyramid[1:]:
                tw.write(level, subfiletype=1, **tiled)
    return pyramid


def write_dicom_slide(folder: Path, tiff_path: Path, *, mpp: float = 0.25) -> None:
    """The levels of ``tiff_path`` (Rules SL1-SL4) as a DICOM WSI in ``folder`` (Rule SL5)."""
    import tifffile
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        VLWholeSlideMicroscopyImageStorage,
        generate_uid,
    )

    def item(**values: Any) -> Dataset:
        ds = Dataset()
        for name, value in values.items():
            setattr(ds, name, value)
        return ds

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    with tifffile.TiffFile(tiff_path) as tiff:
        for k, level in enumerate(tiff.series[0].levels):
            page = level.pages[0]
            (h, w), (th, tw) = (
                (page.imagelength, page.imagewidth),
                (page.tilelength, page.tilewidth),
            )
            jpeg = page.compression == 7
            if jpeg:  # the same JPEG streams, byte for byte
                fh = tiff.filehandle
                frames = []
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                    fh.seek(offset)
                    frames.append(fh.read(count))
                pixel_data = encapsulate(frames)
            else:  # whole tiles (Rule SL4), row by row
                pixels = level.asarray().reshape(h // th, th, w // tw, tw, 3).swapaxes(1, 2)
                frames = list(pixels.reshape(-1, th, tw, 3))
                pixel_data = np.ascontiguousarray(pixels).tobytes()
            kind = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if k:
                kind = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
            spacing = mpp * 2**k / 1000  # mm per pixel
            ds = item(
                SOPClassUID=VLWholeSlideMicroscopyImageStorage,
                SOPInstanceUID=generate_uid(),
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                FrameOfReferenceUID=frame_of_reference,
                Modality="SM",
                PatientName="streamcheck^test",
                PatientID="0",
                ContainerIdentifier="slide-0",
                ImageType=kind,
                InstanceNumber=k + 1,
                DimensionOrganizationType="TILED_FULL",
                TotalPixelMatrixRows=h,
                TotalPixelMatrixColumns=w,
                TotalPixelMatrixFocalPlanes=1,
                Rows=th,
                Columns=tw,
                NumberOfFrames=len(frames),
                SamplesPerPixel=3,
                PhotometricInterpretation="YBR_FULL_422" if jpeg else "RGB",
                PlanarConfiguration=0,
                BitsAllocated=8,
                BitsStored=8,
                HighBit=7,
                PixelRepresentation=0,
                ImagedVolumeWidth=w * spacing,
                ImagedVolumeHeight=h * spacing,
                ImagedVolumeDepth=1.0,
                SharedFunctionalGroupsSequence=Sequence(
                    [
                        item(
                            PixelMeasuresSequence=Sequence(
                                [item(PixelSpacing=[spacing, spacing], SliceThickness=0.001)]
                            ),
                            WholeSlideMicroscopyImageFrameTypeSequence=Sequence(
                                [item(FrameType=kind)]
                            ),
                        )
                    ]
                ),
                NumberOfOpticalPaths=1,
                OpticalPathSequence=Sequence(
                    [
                        item(
                            OpticalPathIdentifier="0",
                            IlluminationTypeCodeSequence=Sequence(
                                [
                                    item(
                                        CodeValue="111744",
                                        CodingSchemeDesignator="DCM",
                                        CodeMeaning="Brightfield illumination",
                                    )
                                ]
                            ),
                        )
                    ]
                ),
                PixelData=pixel_data,
            )
            if jpeg:
                ds["PixelData"].VR = "OB"
                ds.LossyImageCompression = "01"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
            ds.save_as(folder / f"level{k}.dcm", enforce_file_format=True)
