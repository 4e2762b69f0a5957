"""One fixed crop box from the template's brain, and the cube grid it is resized to.

The box is computed once from the template's brain mask, in template world coordinates (mm),
so every subject is cut from the same place and spatial correspondence across the cohort is
kept. By default the box is the brain's bounding box plus a margin (`margin_mm=4`, which keeps
the cortex away from the cube's faces, where the ViT's tokens see padding), resized to the S³ cube
with anisotropic voxels, as the paper's protocol does when it crops the void background and
resizes to 224³. Measured on SRI-24 at 224³: 40 % of the 16³ tokens are at least half brain with
this tight box (141 x 179 x 142 mm, voxels 0.63 x 0.80 x 0.63 mm) against 25 % with a cubic box
(`cubic=True`, 179 mm, isotropic 0.80 mm voxels), so the tight box gives the engine 1.6x more
brain tokens at the same cost. Neither the box nor the margin is given by the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from preprocessing.resample import resample_to_grid
from volumetric.errors import VolscanError

PATCH = 14


@dataclass(frozen=True)
class CropBox:
    """Axis-aligned box in RAS world mm: `lower` (3,) and `upper` (3,) corners (voxel edges)."""

    lower: np.ndarray
    upper: np.ndarray

    @property
    def extent(self) -> np.ndarray:
        """Edge lengths in mm, (3,)."""
        return self.upper - self.lower


def check_cube_size(size: int) -> int:
    """Validate the cube edge: a positive multiple of the ViT patch (14)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < PATCH or size % PATCH:
        raise VolscanError(f"cube size must be a positive multiple of {PATCH} (e.g. 224), got {size!r}")
    return int(size)


def brain_crop_box(mask: np.ndarray, affine: np.ndarray, margin_mm: float = 4.0, cubic: bool = False) -> CropBox:
    """Box around the true voxels of `mask` (X, Y, Z) with RAS `affine` (4, 4), plus `margin_mm`."""
    index = np.argwhere(mask)
    if index.size == 0:
        raise VolscanError("the template's brain mask is empty; cannot derive a crop box")
    # Voxel corners (±0.5) of the bounding box, mapped to world: handles any voxel order.
    lo, hi = index.min(0) - 0.5, index.max(0) + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (affine @ corners.T).T[:, :3]
    lower, upper = world.min(0) - margin_mm, world.max(0) + margin_mm
    if cubic:
        centre, half = (lower + upper) / 2, (upper - lower).max() / 2
        lower, upper = centre - half, centre + half
    return CropBox(lower=lower, upper=upper)


def cube_affine(box: CropBox, size: int) -> np.ndarray:
    """RAS affine (4, 4) of an S³ grid whose voxels tile `box` exactly (RAS voxel order)."""
    spacing = box.extent / size
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = box.lower + spacing / 2
    return affine


def crop_and_resize(array: np.ndarray, affine: np.ndarray, box: CropBox, size: int, order: int = 1) -> np.ndarray:
    """Cut `box` out of `array` (X, Y, Z, already in template space) and resize it to (S, S, S).

    Images use linear interpolation (`order=1`); masks and labels nearest neighbour (`order=0`).
    """
    size = check_cube_size(size)
    return resample_to_grid(array, affine, (size, size, size), cube_affine(box, size), order=order)
