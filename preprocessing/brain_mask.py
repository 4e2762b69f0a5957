"""Brain masks: non-zero rule, template mask refined by intensity, optional HD-BET.

- `nonzero`: voxels != 0 of an already skull-stripped input (the paper's rule for BraTS).
- `template`: the template's brain mask carried into the subject by the registration, then
  refined by intensity: voxels darker than `background_scale` x the Otsu threshold of the whole
  head (air vs tissue) are dropped, holes filled, and only the largest component kept. Otsu on
  a head scan separates air from tissue for T1 and T2 alike; half of it keeps dark CSF and
  partial-volume edges inside the brain.
- `hd-bet`: HD-BET deep-learning skull stripping when the `HD_BET` package and its weights are
  installed (not a dependency of volscan).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

MASK_METHODS = ("auto", "nonzero", "template", "hd-bet")


def choose_mask_method(method: str, skull_stripped: bool) -> str:
    """Resolve `auto`: `nonzero` for skull-stripped input, else `template`."""
    if method not in MASK_METHODS:
        raise VolscanError(f"unknown brain mask method {method!r}; choose one of {', '.join(MASK_METHODS)}")
    if method == "auto":
        return "nonzero" if skull_stripped else "template"
    return method


def nonzero_mask(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels that are not 0 (background of skull-stripped scans is exactly 0)."""
    return np.asarray(array) != 0


def refine_template_mask(image: np.ndarray, carried: np.ndarray, background_scale: float = 0.5) -> np.ndarray:
    """Carried template mask (X, Y, Z) bool, minus dark background voxels of `image` (same grid)."""
    image = np.asarray(image, dtype=np.float32)
    threshold = background_scale * float(threshold_otsu(image))
    mask = carried & (image > threshold)
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


def hdbet_mask(path: str | os.PathLike[str], device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """HD-BET brain mask of the NIfTI at `path`: ((X, Y, Z) bool in file voxel order, affine (4, 4)).

    Raises `VolscanError` with installation instructions when HD-BET is not importable.
    """
    if importlib.util.find_spec("HD_BET") is None:
        raise VolscanError(
            "brain mask method 'hd-bet' needs HD-BET: `pip install hd-bet` (its weights download on first "
            "use); or use --mask-method template (raw scans) / --skull-stripped (already stripped)"
        )
    import torch
    from HD_BET.hd_bet_prediction import get_hdbet_predictor, hdbet_predict

    from preprocessing.io import load_volume

    predictor = get_hdbet_predictor(use_tta=False, device=torch.device(device), verbose=False)
    with tempfile.TemporaryDirectory(prefix="volscan-hdbet-") as tmp:
        out = Path(tmp) / "brain.nii.gz"
        hdbet_predict(str(path), str(out), predictor, keep_brain_mask=True, compute_brain_extracted_image=False)
        masks = sorted(Path(tmp).glob("*mask*.nii.gz")) or [out]
        mask = load_volume(masks[0])
    return mask.array > 0, mask.affine
