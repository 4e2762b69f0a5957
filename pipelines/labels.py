"""Reading masks (labels): one rule for 2D images and 3D volumes.

A mask holds integer labels >= 0: 0 is healthy, any positive value is lesion (sub-regions may
carry different values); it is read to a bool array, lesion = label > 0. Refused, each with one
line naming the file (`InputFileError`):

- non-integer values, negative values (they would read as healthy), more than
  `MAX_LABEL_VALUES` distinct values (an intensity scan in the labels folder);
- 2D, lossy formats (JPEG, JPEG-compressed TIFF): their ringing around an edge makes
  scattered non-zero pixels, which would all count as lesion;
- 2D, colour masks unless every channel is equal (grey saved as RGB is reduced to one channel;
  a drawing in colours has no single label value per pixel);
- 2D, an alpha channel unless it is fully opaque (a transparent background reads as
  non-zero in the colour channels of many editors' files, so the whole image would be lesion).

2D masks are oriented as their images: EXIF orientation is applied to both
(`pipelines.images2d.oriented`). Masks are read in the validation pass, before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.images2d import open_image, oriented
from volumetric.errors import InputFileError

# A label map holds a few integer classes (background, lesion, maybe sub-regions); an intensity
# scan given by mistake has hundreds to thousands of distinct values.
MAX_LABEL_VALUES = 32
# Largest label counted with `np.bincount` (a 64k-entry count); larger ones go through np.unique.
MAX_BINCOUNT_LABEL = 65535
# Pillow's names of lossy encodings: the JPEG format, and TIFF's JPEG compression.
LOSSY_FORMATS = ("JPEG", "MPO")
LOSSY_TIFF_COMPRESSIONS = ("jpeg", "tiff_jpeg")


def lesion_mask(values: np.ndarray, path: str | Path) -> np.ndarray:
    """`values` (any shape) checked as a label map (see the module docstring) -> bool, label > 0."""
    data = np.asarray(values)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise InputFileError(path, "not a label map: it holds non-integer values (is this an intensity scan?)")
    elif data.dtype.kind not in "iub":
        raise InputFileError(path, f"not a label map: values of type {data.dtype}")
    if data.size == 0:
        return data > 0
    low, high = data.min(), data.max()
    if low < 0:
        raise InputFileError(path, f"label map holds the negative value {low:g}; labels are integers >= 0 "
                                   "(0 = healthy)")
    # Counting by bincount is one pass (np.unique sorts): masks are read for every scan.
    distinct = (np.count_nonzero(np.bincount(data.ravel().astype(np.intp))) if high <= MAX_BINCOUNT_LABEL
                else np.unique(data).size)
    if distinct > MAX_LABEL_VALUES:
        raise InputFileError(
            path, f"not a label map: {distinct} distinct values (at most {MAX_LABEL_VALUES}; is this an intensity scan?)"
        )
    return data > 0


def read_mask(path: str | Path, kind: str) -> np.ndarray:
    """The lesion mask of a label file: (X, Y, Z) bool in file voxel order (`kind` "3d") or
    (H, W) bool, EXIF-oriented (`kind` "2d")."""
    if kind == "3d":
        from preprocessing.io import load_volume

        return lesion_mask(load_volume(path).array, path)
    return lesion_mask(_mask_pixels(Path(path)), path)


def _mask_pixels(path: Path) -> np.ndarray:
    """(H, W) label values of a 2D mask image (alpha and colour reduced or refused)."""
    with open_image(path, "mask image") as image:
        compression = str(image.info.get("compression", "")).lower()
        if image.format in LOSSY_FORMATS or (image.format == "TIFF" and compression in LOSSY_TIFF_COMPRESSIONS):
            raise InputFileError(path, f"mask saved in a lossy format ({image.format}"
                                       f"{', ' + compression if image.format == 'TIFF' else ''}); its compression "
                                       "noise would count as lesion: save masks as PNG or uncompressed TIFF")
        image = oriented(image)
    if image.mode == "P":  # palette indices are the labels, unless the palette carries alpha
        image = image.convert("RGBA") if "transparency" in image.info else image
    bands = image.getbands()
    array = np.asarray(image)
    if "A" in bands:
        alpha = array[..., bands.index("A")]
        if (alpha != np.iinfo(alpha.dtype).max).any():
            raise InputFileError(path, "mask has a transparency (alpha) channel that is not fully opaque; save it as "
                                       "one grey channel (0 = healthy, > 0 = lesion)")
        array = array[..., [i for i, band in enumerate(bands) if band != "A"]]
    if array.ndim == 3:
        if (array != array[..., :1]).any():
            raise InputFileError(path, f"colour mask ({image.mode}) whose channels differ; save it as one grey "
                                       "channel (0 = healthy, > 0 = lesion)")
        array = array[..., 0]
    return array
