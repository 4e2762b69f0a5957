"""Reading and writing volumes: NIfTI (and DICOM series folders) with orientation kept in the affine.

Arrays stay in the file's own voxel order; the `(4, 4)` affine (voxel index → RAS+ world mm,
nibabel's convention) is the only orientation information we use, so a scan stored in RAS,
LPS or PIR order lands in the same place. SimpleITK images (LPS world) are built from and
converted back to (array, affine) pairs here and nowhere else.
"""

from __future__ import annotations

import locale
import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from volumetric.atomic_files import atomic_path
from volumetric.errors import InputFileError, first_line

if TYPE_CHECKING:  # annotations only; both are imported where used (slow to import)
    import nibabel as nib
    import SimpleITK as sitk

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# deflate cannot compress more than ~1032:1, so a .nii.gz never expands beyond this factor.
MAX_GZIP_RATIO = 1100
# nibabel's RAS+ world vs ITK's LPS+ world differ by a flip of the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """One 3D scan: `array` (X, Y, Z) float32 in file voxel order, `affine` (4, 4) voxel → RAS mm."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: nib.Nifti1Header | None = None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, shape (3,)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def subject_id(path: str | os.PathLike[str]) -> str:
    """File name without `.nii` / `.nii.gz` (folder name for a DICOM series)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """True for names ending in `.nii` or `.nii.gz`."""
    return str(path).endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D NIfTI file (or a DICOM series folder) as float32 in file voxel order.

    Accepts trailing singleton dimensions (X, Y, Z, 1); refuses 2D, real 4D, non-finite data,
    singular affines and unreadable files with `InputFileError(path, problem)`.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "no such file or folder")
    if path.is_dir():
        return _load_dicom_series(path)
    if not is_nifti_path(path):
        raise InputFileError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
    import nibabel as nib  # here, like SimpleITK: `volscan` answers input errors before loading them

    try:
        image = nib.load(str(path))
        check_header(path, image)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except InputFileError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise InputFileError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    array = _as_3d(path, data)
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(path, affine)
    _check_finite(path, array)
    return Volume(array=array, affine=affine, path=path, header=image.header)


def check_header(path: str | os.PathLike[str], image: nib.Nifti1Image) -> None:
    """Refuse, before reading any voxel, complex or RGB voxel types (numpy would silently keep the
    real part) and a header claiming more data than the file can hold (a MemoryError otherwise):
    a .nii must hold offset + data bytes, a .nii.gz cannot expand more than `MAX_GZIP_RATIO`-fold."""
    path = Path(path)
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputFileError(path, f"voxel type {dtype} is not a real scalar (complex or RGB data); "
                                   "convert it to one real-valued volume (e.g. the magnitude)")
    need = int(np.prod(image.shape, dtype=np.float64)) * dtype.itemsize
    size = path.stat().st_size
    gz = path.name.lower().endswith(".gz")
    if (gz and need > MAX_GZIP_RATIO * size) or (not gz and int(image.dataobj.offset) + need > size):
        grid = "x".join(str(s) for s in image.shape)
        raise InputFileError(path, f"header claims {grid} voxels ({need / 2**20:.1f} MiB) but the file has only "
                                   f"{size} bytes; truncated file or corrupt header")


def load_label(path: str | os.PathLike[str], image: Volume) -> Volume:
    """Read a label volume and check that it lies on `image`'s grid (shape and affine)."""
    label = load_volume(path)
    check_same_grid(label, image)
    return label


def check_same_grid(label: Volume, image: Volume, atol_mm: float = 1e-3) -> None:
    """Raise `InputFileError` naming the label file unless it shares `image`'s voxel grid."""
    name = label.path if label.path is not None else "label"
    if label.array.shape != image.array.shape:
        raise InputFileError(
            name, f"label grid {label.array.shape} does not match its image {image.array.shape} ({image.path})"
        )
    if not np.allclose(label.affine, image.affine, atol=atol_mm):
        raise InputFileError(name, f"label affine does not match its image's affine ({image.path})")


def save_volume(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike[str],
    *,
    dtype: np.dtype | type | None = None,
    scaled_int16: bool = False,
) -> Path:
    """Write `array` (X, Y, Z) with `affine` (4, 4) to NIfTI atomically (temp name, then replace).

    `scaled_int16`: store a float array as int16 with the NIfTI scale factor max|array| / 32767
    and no offset (half of float32's bytes before compression; zero stays exactly zero; every
    value within half a step, max|array| / 65534, of the original, up to float32 rounding); `load_volume` applies it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if dtype is not None:
        data = data.astype(dtype)
    slope = None
    if scaled_int16:
        top = float(np.abs(data).max()) if data.size else 0.0
        slope = top / np.iinfo(np.int16).max if top > 0 else 1.0
        data = np.round(data / slope).astype(np.int16)
    affine = np.asarray(affine, dtype=np.float64)
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    # Both qform and sform, code 1: ITK (ITK-SNAP, 3D Slicer) and nibabel then agree on the geometry.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = ".tmp.nii.gz" if str(path).endswith(".gz") else ".tmp.nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, tmp)
    return path


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS world) for `array` (X, Y, Z) in voxel order with RAS `affine`."""
    import SimpleITK as sitk  # here: `volscan` answers input errors before loading it

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((_RAS_TO_LPS @ (affine[:3, :3] / spacing)).ravel().tolist())
    image.SetOrigin((_RAS_TO_LPS @ affine[:3, 3]).tolist())
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(array (X, Y, Z), RAS affine (4, 4)) of a SimpleITK image; inverse of `to_sitk`."""
    import SimpleITK as sitk

    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.GetOrigin())
    return array, affine


@contextmanager
def _locale_kept() -> Iterator[None]:
    """GDCM (behind SimpleITK's series reader) switches the process locale to "C" and leaves it
    there, after which every `open()` without an encoding decodes ASCII; put it back."""
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _dicom_series_ids(folder: Path) -> tuple[str, ...]:
    import SimpleITK as sitk

    with _locale_kept():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _load_dicom_series(folder: Path) -> Volume:
    with _locale_kept():
        return _read_dicom_series(folder)


def _read_dicom_series(folder: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = _dicom_series_ids(folder)
    if not series:
        raise InputFileError(folder, "folder holds no DICOM series")
    if len(series) > 1:
        raise InputFileError(folder, f"folder holds {len(series)} DICOM series; put one series per folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputFileError(folder, f"unreadable DICOM series ({_short(exc)})") from None
    data, affine = from_sitk(image)
    array = _as_3d(folder, data.astype(np.float32))
    _check_affine(folder, affine)
    _check_finite(folder, array)
    return Volume(array=array, affine=affine, path=folder)


def _as_3d(path: Path, data: np.ndarray) -> np.ndarray:
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise InputFileError(path, f"is {len(shape)}D with shape {shape}; expected one 3D volume")
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputFileError(path, f"is 2D (shape {shape}); expected a 3D volume")
    return np.ascontiguousarray(data, dtype=np.float32)


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputFileError(path, "has an invalid (non-finite or singular) voxel-to-world affine")


def _check_finite(path: Path, array: np.ndarray) -> None:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputFileError(path, f"contains {bad} NaN/Inf voxels")


def _short(exc: BaseException) -> str:
    return first_line(exc)[:200]


def find_volumes(folder: str | os.PathLike[str]) -> list[Path]:
    """Inputs of a folder, sorted: `.nii` / `.nii.gz` files and sub-folders holding one DICOM series.

    Other files are ignored with a log line; an empty result raises `InputFileError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "is not a folder")
    found, ignored = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and is_nifti_path(entry):
            found.append(entry)
        elif entry.is_dir() and _dicom_series_ids(entry):
            found.append(entry)
        else:
            ignored.append(entry.name)
    if ignored:
        log.info("ignoring %d non-NIfTI entries in %s: %s", len(ignored), folder, ", ".join(ignored[:5]))
    if not found:
        raise InputFileError(folder, "holds no .nii/.nii.gz files or DICOM series folders")
    return found
