"""`NativeMapping`: how one input's voxel grid relates to its preprocessed cube, both ways.

It holds the input grid (shape, RAS affine), the cube grid (edge, RAS affine) and the affine
world map from template space to the input's world (identity for already-registered input).
`to_native` brings a cube-space array (an anomaly map) back onto the input's own grid, so it
can be saved with the input's affine and overlaid in ITK-SNAP / 3D Slicer; `to_cube` brings a
native-grid array (a lesion label) into the cube. Saved as JSON; `write_itk_transform` also
exports the registration as an ITK `.tfm` for other tools.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volumetric.atomic_files import atomic_path, atomic_write_bytes
from preprocessing.resample import ras_to_sitk_transform, resample_to_grid
from volumetric.errors import InputFileError, VolscanError

FORMAT = "volscan-native-mapping/1"


@dataclass(frozen=True)
class NativeMapping:
    """Input grid `native_shape` (3,) + `native_affine` (4, 4); cube `cube_affine` (4, 4), edge `size`;
    `template_to_native` (4, 4) maps template-space world points (RAS mm) to input world points."""

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    size: int
    cube_affine: np.ndarray
    template_to_native: np.ndarray

    def to_native(self, cube_array: np.ndarray, order: int = 1) -> np.ndarray:
        """(S, S, S) cube-space array → input grid `native_shape`, input voxel order; 0 outside the cube."""
        self._check(cube_array, (self.size,) * 3, "cube array")
        return resample_to_grid(
            cube_array, self.cube_affine, self.native_shape, self.native_affine,
            world=np.linalg.inv(self.template_to_native), order=order,
        )

    def to_cube(self, native_array: np.ndarray, order: int = 0) -> np.ndarray:
        """Input-grid array `native_shape` → (S, S, S) cube (nearest neighbour by default, for labels)."""
        self._check(native_array, self.native_shape, "native array")
        return resample_to_grid(
            native_array, self.native_affine, (self.size,) * 3, self.cube_affine,
            world=self.template_to_native, order=order,
        )

    def to_dict(self) -> dict:
        """JSON-able description (format tag, grids and the world map)."""
        return {
            "format": FORMAT,
            "native_shape": list(self.native_shape),
            "native_affine": self.native_affine.tolist(),
            "size": self.size,
            "cube_affine": self.cube_affine.tolist(),
            "template_to_native": self.template_to_native.tolist(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON atomically."""
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def from_dict(cls, data: dict) -> "NativeMapping":
        """Inverse of `to_dict`; `ValueError`/`KeyError` on malformed input."""
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            native_shape=tuple(int(v) for v in data["native_shape"]),
            native_affine=np.asarray(data["native_affine"], dtype=float).reshape(4, 4),
            size=int(data["size"]),
            cube_affine=np.asarray(data["cube_affine"], dtype=float).reshape(4, 4),
            template_to_native=np.asarray(data["template_to_native"], dtype=float).reshape(4, 4),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NativeMapping":
        """Read a mapping written by `save`; `InputFileError` if missing or malformed."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputFileError(path, f"not a volscan native mapping ({exc})") from None

    def write_itk_transform(self, path: str | os.PathLike[str]) -> Path:
        """Export the template → input map as an ITK transform file (LPS; what ITK resamplers expect)."""
        path = Path(path)
        # The suffix tells ITK which transform file format to write.
        with atomic_path(path, suffix=path.suffix) as tmp:
            sitk.WriteTransform(ras_to_sitk_transform(self.template_to_native), str(tmp))
        return path

    def _check(self, array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
        if tuple(np.shape(array)) != tuple(shape):
            raise VolscanError(f"{what} has shape {tuple(np.shape(array))}, expected {tuple(shape)}")
