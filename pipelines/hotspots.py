"""Where to look in a scan: the hottest point of its anomaly map and the region around it.

The region is cut at the run's map threshold, the flag threshold of `pipelines.flagging`: a
map voxel above it scores higher than a typical scan's hottest token, so the above-threshold
region of a flagged scan is the part that made it stand out.

The hotspot is the map's maximum on the input's own grid, searched only inside the scan's brain
mask on that grid (3D: the cube's brain mask brought back with the scan's `NativeMapping`), so
it always lies on tissue that was scored: a token straddling the brain's edge also covers
voxels outside it, and an upsampled token grid is flat over the outer half of its edge tokens,
where a plain argmax lands on the first (outermost) voxel of the plateau. Among voxels tied at
the maximum (such a plateau), the one nearest their centroid is taken. It is given as native
voxel indices (i, j, k) as stored in the file, and world millimetres `affine @ (i, j, k, 1)`.
NIfTI affines map to RAS+ (x grows towards the patient's right, y anterior, z superior), the
coordinates ITK-SNAP and 3D Slicer display, so they can be typed into either viewer's cursor box
unchanged (SimpleITK would give LPS: x and y negated; volscan never reports those). The region
is the 26-connected component of above-threshold voxels holding the hotspot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volumetric.errors import VolscanError

@dataclass(frozen=True)
class Hotspot:
    """`voxel`: native indices (3D: i, j, k; 2D: row, column); `world_mm`: RAS+ millimetres
    (None for 2D); `value`: map value there; `region_voxels` / `region_mm3`: size of the
    above-threshold region holding the hotspot (0 when the hotspot is below the threshold)."""

    voxel: tuple[int, ...]
    world_mm: tuple[float, float, float] | None
    value: float
    region_voxels: int
    region_mm3: float | None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (the report's per-scan `hotspot`)."""
        return {
            "voxel": list(self.voxel),
            "world_mm_ras": None if self.world_mm is None else [round(v, 2) for v in self.world_mm],
            "value": self.value,
            "region_voxels": self.region_voxels,
            "region_mm3": None if self.region_mm3 is None else round(self.region_mm3, 1),
        }


def find_hotspot(score_map: np.ndarray, threshold: float, affine: np.ndarray | None = None,
                 region: np.ndarray | None = None) -> Hotspot:
    """Hotspot of a native-grid map (3D (I, J, K) with its (4, 4) RAS `affine`, or 2D (H, W)
    without) and the size of the connected above-`threshold` region holding it.

    `region`: bool array of the map's shape (the brain mask on the map's grid); the hotspot is
    searched only there (None or empty: everywhere)."""
    data = np.nan_to_num(np.asarray(score_map, dtype=np.float32), nan=0.0)
    voxel = _peak(data, None if region is None else np.asarray(region, dtype=bool))
    value = float(data[voxel])
    region_voxels = 0
    if value > threshold:
        components, _ = ndimage.label(data > threshold, structure=np.ones((3,) * data.ndim, dtype=bool))
        region_voxels = int(np.count_nonzero(components == components[voxel]))
    world = region_mm3 = None
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        world = tuple(float(v) for v in affine[:3, :3] @ np.asarray(voxel, dtype=np.float64) + affine[:3, 3])
        region_mm3 = region_voxels * abs(float(np.linalg.det(affine[:3, :3])))
    return Hotspot(voxel, world, value, region_voxels, region_mm3)


def _peak(data: np.ndarray, region: np.ndarray | None) -> tuple[int, ...]:
    """Index of the maximum of `data` within `region`; among tied voxels (a plateau), the one
    nearest their centroid."""
    if region is not None and region.shape != data.shape:
        raise VolscanError(f"region shape {region.shape} does not match the map {data.shape}")
    if region is None or not region.any():
        region = np.ones(data.shape, dtype=bool)
    top = np.max(data[region])
    tied = np.argwhere(region & (data >= top))  # (T, ndim)
    nearest = np.argmin(((tied - tied.mean(axis=0)) ** 2).sum(axis=1))
    return tuple(int(v) for v in tied[nearest])
