"""Resampling an array from one voxel grid onto another through world coordinates (SimpleITK).

Every spatial step (registration warp, crop + resize to the cube, the way back to the input's
grid) is one call of `resample_to_grid`, so a volume is interpolated once on its way into the
cube and once on its way back. SimpleITK is used because its resampler is multi-threaded and
works in float32.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from preprocessing.io import from_sitk, to_sitk

_INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_sitk_transform(world: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK transform (LPS) for a (4, 4) RAS world → world matrix."""
    lps = _LPS @ world @ _LPS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def sitk_transform_to_ras(transform: sitk.Transform) -> np.ndarray:
    """(4, 4) RAS world → world matrix of a linear SimpleITK transform (any centre)."""
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = (mapped[1:] - mapped[0]).T
    return _LPS @ lps @ _LPS


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    target_affine: np.ndarray,
    *,
    world: np.ndarray | None = None,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Sample `array` (X, Y, Z) with RAS `affine` onto a grid of `shape` with `target_affine`.

    `world` (4, 4) maps target world points (RAS mm) to source world points (identity if None).
    `order`: 0 nearest (dtype kept), 1 linear, 3 B-spline (float32 result). Outside → `fill`.
    """
    if order not in _INTERPOLATORS:
        raise ValueError(f"interpolation order must be one of {sorted(_INTERPOLATORS)}, got {order}")
    source = np.asarray(array)
    kept_dtype = source.dtype
    work = source.astype(np.float32) if order else source.astype(np.float32 if source.dtype == bool else source.dtype)
    reference = to_sitk(np.zeros(tuple(shape), dtype=np.uint8), target_affine)
    transform = ras_to_sitk_transform(np.eye(4) if world is None else world)
    out = sitk.Resample(
        to_sitk(work, affine), reference, transform, _INTERPOLATORS[order], float(fill), sitk.sitkUnknown
    )
    result, _ = from_sitk(out)
    if order == 0:
        return result.astype(kept_dtype)
    return result.astype(np.float32)
