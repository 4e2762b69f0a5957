"""2D inputs (PNG/JPEG/TIFF): reading, resizing to the square model input, and map pictures.

The 2D case is the degenerate one: each image is resized to `size x size` (a multiple of 14)
and tokenised in one ViT pass. Maps come back to the image's own size and are written as a
float32 TIFF (exact scores, for evaluation and analysis), a colour heat map PNG and an
overlay PNG. The colour scale is shared by the whole run (`[low, high]` = the cohort's score
range), so a clean image looks cold instead of being stretched to full colour.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from volumetric.errors import InputFileError

# Heat-map colours; perceptually uniform and readable for colour-blind users.
COLORMAP = "inferno"
OVERLAY_ALPHA = 0.5
# EXIF orientations that turn the stored picture by 90 degrees (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


@contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """`Image.open` held to volscan's rules, each failure one `InputFileError` naming the file:
    unreadable, larger than Pillow's decompression-bomb limit, or holding several pages/frames
    (a multi-page TIFF would otherwise silently give its first page)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                frames = int(getattr(image, "n_frames", 1))
                if frames > 1:
                    raise InputFileError(path, f"holds {frames} pages/frames; volscan reads single-page images "
                                               "(split the pages, or save a 3D stack as NIfTI)")
                yield image
    except InputFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputFileError(path, f"{what} is larger than {Image.MAX_IMAGE_PIXELS} pixels "
                                   "(Pillow's decompression-bomb limit); refusing to read it") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise InputFileError(path, f"not a readable {what} ({exc})") from None


def oriented(image: Image.Image) -> Image.Image:
    """`image` as it is displayed: its EXIF orientation applied (a camera's or phone's picture is
    stored sideways with a tag saying so); images and masks both go through it."""
    return ImageOps.exif_transpose(image)


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of `image` as displayed (EXIF orientation), from its header only."""
    width, height = image.size
    turned = image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS
    return (width, height) if turned else (height, width)


def load_image(path: str | Path) -> np.ndarray:
    """Image file -> (H, W, 3) float32 in [0, 1] (grey images are repeated to three channels),
    EXIF-oriented (`oriented`).

    Float images with NaN/Inf pixels are refused (as NaN voxels are in 3D)."""
    path = Path(path)
    with open_image(path) as image:
        image = oriented(image)
        if image.mode in ("I", "I;16", "I;16B", "F"):
            array = np.asarray(image, dtype=np.float32)
        else:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputFileError(path, f"contains {bad} NaN/Inf pixels")
    span = float(array.max() - array.min())
    array = (array - array.min()) / span if span > 0 else np.zeros_like(array)
    return np.repeat(array[..., None], 3, axis=2)


def resize(array: np.ndarray, shape: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize (H, W) or (H, W, C) to `shape` (bilinear, or nearest for masks); float32 or bool."""
    import torch  # here, not at import: input checks (pipelines.subjects imports this module) stay fast
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    channels_last = tensor.ndim == 3
    tensor = tensor.permute(2, 0, 1)[None] if channels_last else tensor[None, None]
    if nearest:
        out = F.interpolate(tensor, size=shape, mode="nearest-exact")
    else:
        out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    out = out[0].permute(1, 2, 0) if channels_last else out[0, 0]
    result = out.numpy()
    return result > 0.5 if nearest else result.astype(np.float32)


def write_float_map(scores: np.ndarray, path: str | Path) -> None:
    """(H, W) float scores -> 32-bit float TIFF (exact values)."""
    Image.fromarray(np.asarray(scores, dtype=np.float32), mode="F").save(path, format="TIFF")


def read_float_map(path: str | Path) -> np.ndarray:
    """Inverse of `write_float_map`: (H, W) float32."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32)


def heat_rgb(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 colours on the fixed scale `[low, high]`."""
    import matplotlib

    span = high - low if high > low else 1.0
    normalised = np.clip((np.asarray(scores, dtype=np.float64) - low) / span, 0.0, 1.0)
    return (matplotlib.colormaps[COLORMAP](normalised)[..., :3] * 255).astype(np.uint8)


def write_map_pictures(
    image: np.ndarray, scores: np.ndarray, heat_path: Path, overlay_path: Path, low: float, high: float
) -> None:
    """Heat map PNG and overlay PNG of `scores` (H, W) over `image` (H, W, 3) in [0, 1]."""
    heat = heat_rgb(scores, low, high)
    Image.fromarray(heat).save(heat_path, format="PNG")
    base = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255
    overlay = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat
    Image.fromarray(overlay.astype(np.uint8)).save(overlay_path, format="PNG")
