"""Data made in code for the preprocessing tests (imported by tests/test_preprocessing_*.py).

A small template (SRI-24 resampled to 4 mm, written in the generic `template.nii.gz` +
`brain_mask.nii.gz` layout), copies of it warped by known affines, and re-orientations of an
image into other voxel orders (same world content, different array layout).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from preprocessing.io import save_volume
from preprocessing.resample import resample_to_grid
from preprocessing.template import Template, load_template


def small_template(sri24_dir: Path, folder: Path, spacing: float = 4.0) -> Template:
    """SRI-24 resampled to `spacing` mm (RAS order), saved as template.nii.gz + brain_mask.nii.gz."""
    full = load_template(sri24_dir)
    shape = tuple(int(round(s / spacing)) for s in full.image.array.shape)
    affine = full.image.affine.copy()
    affine[:3, :3] *= spacing
    affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.5) - full.image.affine[:3, :3] @ np.full(3, 0.5)
    image = resample_to_grid(full.image.array, full.image.affine, shape, affine, order=1)
    mask = resample_to_grid(full.brain_mask, full.image.affine, shape, affine, order=0)
    save_volume(image, affine, folder / "template.nii.gz", dtype=np.float32)
    save_volume(mask, affine, folder / "brain_mask.nii.gz", dtype=np.uint8)
    return load_template(folder)


def known_affine(degrees=(8.0, -6.0, 10.0), scale=1.06, shift_mm=(6.0, -5.0, 4.0), centre=(0, 0, 0)) -> np.ndarray:
    """(4, 4) RAS map: input-world point → template-world point (rotation about `centre`, scale, shift)."""
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() * scale
    centre = np.asarray(centre, dtype=float)
    world[:3, 3] = centre - world[:3, :3] @ centre + np.asarray(shift_mm)
    return world


def warped_copy(template: Template, input_to_template: np.ndarray, spacing: float = 4.0, codes: str = "PIR"):
    """The template seen through `input_to_template`, on a `codes`-ordered grid covering the head.

    Returns (image (X, Y, Z) float32, brain mask (X, Y, Z) bool, affine (4, 4)).
    """
    tmpl = template.image
    centre = tmpl.affine[:3, :3] @ ((np.array(tmpl.array.shape) - 1) / 2) + tmpl.affine[:3, 3]
    extent = np.abs(tmpl.affine[:3, :3]).sum(0) * tmpl.array.shape
    axes = nib.orientations.axcodes2ornt(codes)
    rotation = np.zeros((3, 3))
    for out_axis, (world_axis, flip) in enumerate(axes):
        rotation[int(world_axis), out_axis] = flip * spacing
    shape = tuple(int(np.ceil(1.2 * extent[int(world_axis)] / spacing)) for world_axis, _ in axes)
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = centre - rotation @ ((np.array(shape) - 1) / 2)
    image = resample_to_grid(tmpl.array, tmpl.affine, shape, affine, world=input_to_template, order=1)
    mask = resample_to_grid(template.brain_mask, tmpl.affine, shape, affine, world=input_to_template, order=0)
    return image, mask, affine


def reoriented(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in voxel order `codes` (e.g. "LPS", "PIR"): exact voxel permutation/flip."""
    start = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(codes))
    new = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(new), new_affine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
