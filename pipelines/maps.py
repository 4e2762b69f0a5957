"""From token-grid scores to anomaly maps: upsampling to the cube / square image, NIfTI maps.

Each token covers a 14-voxel (14-pixel) block. Upsampling is linear with `align_corners=False`,
which puts each token's value at the centre of its block, like the paper's interpolated maps.
Void tokens (outside the brain) have no score (NaN from the engine); they become 0 before
interpolation, below every real score (distances are non-negative), so the background reads
as "normal" in the viewer and cannot create a maximum.

On a scan's own grid the map is kept inside its brain mask (`native_brain_map`): a token at the
brain's edge scores a 14-voxel block that reaches past the brain, and its value, spread over that
block by the interpolation, would otherwise colour skull, scalp or air, where nothing was scored.
The cube-space maps that metrics read (`upsample_scores`) are the paper's, unmasked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from volumetric.atomic_files import atomic_path
from volumetric.errors import InputFileError, VolscanError

if TYPE_CHECKING:
    from preprocessing.native_mapping import NativeMapping


def upsample_scores(grid_scores: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """(g, g, g) or (h, w) token scores (NaN = void) -> (size,)*ndim float32 map, void as 0."""
    grid = torch.as_tensor(np.asarray(grid_scores, dtype=np.float32))
    if grid.ndim not in (2, 3):
        raise VolscanError(f"token scores must be a 2D or 3D grid, got shape {tuple(grid.shape)}")
    grid = torch.nan_to_num(grid, nan=0.0)
    mode = "trilinear" if grid.ndim == 3 else "bilinear"
    out = F.interpolate(grid[None, None], size=(size,) * grid.ndim, mode=mode, align_corners=False)
    return out[0, 0].numpy()


def native_brain_map(
    cube_map: np.ndarray, mapping: "NativeMapping", cube_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(S, S, S) cube map -> (native map, native brain mask) on the input's own grid.

    The map is resampled linearly (`NativeMapping.to_native`), the cube's brain mask by nearest
    neighbour; the map is 0 outside that mask. Without a cube mask (or when it maps onto no
    native voxel) the map is returned unmasked and the mask is None."""
    native = mapping.to_native(cube_map, order=1)
    if cube_mask is None:
        return native, None
    brain = mapping.to_native(np.asarray(cube_mask, dtype=np.float32), order=0) > 0.5
    if not brain.any():
        return native, None
    return np.where(brain, native, 0.0).astype(np.float32), brain


def score_range(element_scores: np.ndarray) -> tuple[float, float]:
    """(low, high) bounding every upsampled map of `element_scores` (N, *grid), NaN = void.

    Linear interpolation is a convex combination, so maps stay within [min(0, min), max].
    """
    finite = np.asarray(element_scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise VolscanError("no valid token scores (every token is void)")
    return min(0.0, float(finite.min())), float(finite.max())


def save_map_like(array: np.ndarray, reference: str | Path, path: str | Path) -> Path:
    """Save `array` (the reference's own 3D grid) as float32 NIfTI with the reference's affine,
    qform/sform codes and units, so viewers overlay it exactly on the input scan."""
    try:
        ref = nib.load(str(reference))
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise InputFileError(reference, f"not a readable NIfTI file ({type(exc).__name__})") from None
    data = np.asarray(array, dtype=np.float32)
    if data.shape != tuple(ref.shape[:3]):
        raise VolscanError(f"map shape {data.shape} does not match {reference} grid {tuple(ref.shape[:3])}")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_xyzt_units(*ref.header.get_xyzt_units())
    image = nib.Nifti1Image(data, ref.affine, header=header)
    image.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
    image.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    # nibabel compresses by the name's extension: the temporary keeps the target's (.nii or .nii.gz).
    with atomic_path(path, suffix=".tmp.nii" if str(path).endswith(".nii") else ".tmp.nii.gz") as tmp:
        nib.save(image, tmp)
    return Path(path)
