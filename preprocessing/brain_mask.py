"""Brain masks: which extractor a scan gets, and the two rule-based ones.

Methods (`PreprocessSettings.brain_mask`):
- `hd-bet`: HD-BET (the paper's choice; T1, T1c, T2, FLAIR), see `preprocessing.hdbet`.
- `deepbet`: deepbet (weights inside its wheel: works offline; trained on T1-weighted scans).
- `nonzero`: voxels != 0 of an already skull-stripped input (the paper's rule for BraTS).
- `template`: the template's brain mask carried into the subject by the registration, then
  refined by intensity: voxels darker than `background_scale` x the Otsu threshold of the whole
  head (air vs tissue) are dropped, holes filled, and only the largest component kept. Otsu on
  a head scan separates air from tissue for T1 and T2 alike; half of it keeps dark CSF and
  partial-volume edges inside the brain. Its boundary follows the template, not the scan: the
  last resort, always with a warning.
- `auto`: `nonzero` for skull-stripped input; else deepbet for the contrasts it handles
  (`DEEPBET_CONTRASTS`): on the two real heads measured it scored a higher Dice than HD-BET in
  both modes (SRI-24 head: deepbet 0.981, HD-BET fast 0.957, accurate 0.957) in seconds per scan
  (docs/preprocessing.md); else HD-BET when installed and the extractors run on a GPU
  (`mask_device` "cuda..."; on a CPU it takes minutes per scan);
  else `template`, with a warning. The choice is made per scan (its contrast comes from
  `PreprocessSettings.contrast` or, for "auto", from the file name).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from preprocessing.choices import MASK_METHODS
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

# deepbet was trained on T1-weighted scans; on the T2-like phantom of docs/preprocessing.md its
# Dice stays >= 0.95, so `auto` also uses it for T2/FLAIR/PD/unknown when HD-BET is absent: a
# learned mask of the scan itself beats the template's boundary (the reason for issue 10).
DEEPBET_CONTRASTS = ("t1", "t1c", "t2", "flair", "pd", "other")
TEMPLATE_BOUNDARY = "the registered template's brain mask was used: its boundary follows the template, not this scan"
TEMPLATE_WARNING = f"no learned brain extractor available (pip install deepbet, or volscan[hd-bet]); {TEMPLATE_BOUNDARY}"

# File-name tokens -> contrast (BraTS: t1n/t1c/t2w/t2f, older BraTS: t1/t1ce/t2/flair, IXI: T1/T2/PD).
_CONTRAST_TOKENS = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "mprage": "t1",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
    "pd": "pd", "pdw": "pd",
}


@dataclass(frozen=True)
class MaskChoice:
    """The extractor used for one scan (`method`, never "auto") and the warning to report, if any."""

    method: str
    contrast: str
    warning: str | None = None


def guess_contrast(path: str | Path | None) -> str:
    """Contrast from a file name's tokens (`IXI002-Guys-0828-T2.nii.gz` -> "t2"); "other" if none."""
    if path is None:
        return "other"
    tokens = re.split(r"[^a-z0-9]+", Path(path).name.lower())
    found = [_CONTRAST_TOKENS[t] for t in tokens if t in _CONTRAST_TOKENS]
    return found[-1] if found else "other"


def choose_mask_method(
    method: str, skull_stripped: bool, contrast: str, path: str | Path | None, hdbet_ready: bool, deepbet_ready: bool
) -> MaskChoice:
    """Resolve `method` for one scan (see the module docstring for `auto`'s order)."""
    if method not in MASK_METHODS:
        raise VolscanError(f"unknown brain mask method {method!r}; choose one of {', '.join(MASK_METHODS)}")
    contrast = guess_contrast(path) if contrast == "auto" else contrast
    if method != "auto":
        return MaskChoice(method, contrast, TEMPLATE_BOUNDARY if method == "template" else None)
    if skull_stripped:
        return MaskChoice("nonzero", contrast)
    if deepbet_ready and contrast in DEEPBET_CONTRASTS:
        return MaskChoice("deepbet", contrast)
    if hdbet_ready:
        return MaskChoice("hd-bet", contrast)
    return MaskChoice("template", contrast, TEMPLATE_WARNING)


def nonzero_mask(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels that are not 0 (background of skull-stripped scans is exactly 0)."""
    return np.asarray(array) != 0


def refine_template_mask(image: np.ndarray, carried: np.ndarray, background_scale: float = 0.5) -> np.ndarray:
    """Carried template mask (X, Y, Z) bool, minus dark background voxels of `image` (same grid)."""
    image = np.asarray(image, dtype=np.float32)
    threshold = background_scale * float(threshold_otsu(image))
    mask = carried & (image > threshold)
    mask = ndimage.binary_fill_holes(mask)
    return largest_component(mask)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the largest face-connected component of `mask` (all False if empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))
