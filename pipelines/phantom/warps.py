"""Per-subject geometry of a phantom: native grid (voxel size, voxel order) and the warp to the template.

A subject is rendered by *pulling back*: every native voxel's world position `w` is mapped to
template world coordinates `t = c + A (w - c - shift)` followed by a smooth elastic displacement
`t += u(t)`, and the template (and any lesion, defined in template space) is evaluated at `t`.
So the lesion of the consistent group sits at one template location and moves with each
subject's own anatomy, and labels are exact in the subject's own grid.

Defaults (chosen, not from the paper; they mimic inter-subject variation after the scanner
places the head, and stay inside what an affine registration plus a 14^3-cube tokeniser
tolerate): rotation up to 8 degrees per axis, isotropic-ish scale 0.92-1.08 per axis, shift up to
6 mm, elastic displacement with 3 mm standard deviation on a 5^3 control grid (cubic
interpolation, so the field is smooth on the ~40 mm scale of gyri and ventricles), and native
voxels 0.9-1.3 times the template spacing (in-plane shared, slice thickness drawn separately).
`ResidualWarp` (off by default; `PhantomConfig.registration_error_mm`): a further smooth
displacement of a chosen largest size per scan, the error left after registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .anatomy import Anatomy

# Voxel orders seen in practice (scanner native, radiological, FSL, DICOM-like, sagittal acquisitions).
ORIENTATIONS = ("RAS", "LPS", "LAS", "LPI", "PIR", "ASL", "RSP", "IPL")


@dataclass(frozen=True)
class WarpSettings:
    """Ranges of the per-subject variation (see module docstring for why these defaults)."""

    rotation_deg: float = 8.0
    scale_range: tuple[float, float] = (0.92, 1.08)
    shift_mm: float = 6.0
    elastic_mm: float = 3.0
    control_points: int = 5
    voxel_scale: tuple[float, float] = (0.9, 1.3)
    orientations: tuple[str, ...] = ORIENTATIONS


@dataclass
class SubjectGeometry:
    """Native grid and warp of one subject.

    `shape` native voxels; `affine` (4, 4) native voxel -> world mm; `linear` (3, 3) and `shift`
    (3,) the affine part of the pull-back; `elastic` (3, k, k, k) control displacements in mm
    over the template field of view; `orientation` the voxel order (e.g. "LPS").
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    linear: np.ndarray
    shift: np.ndarray
    elastic: np.ndarray
    orientation: str

    def describe(self) -> dict:
        """JSON-ready summary (voxel size in mm, orientation, shape) for cohort.json."""
        spacing = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return {"shape": list(self.shape), "voxel_mm": [round(float(s), 4) for s in spacing],
                "orientation": self.orientation, "affine": np.round(self.affine, 5).tolist()}


def sample_geometry(rng: np.random.Generator, anatomy: Anatomy, settings: WarpSettings) -> SubjectGeometry:
    """Draw one subject's native grid and warp relative to `anatomy`'s template grid."""
    orientation = str(rng.choice(settings.orientations))
    in_plane, thickness = rng.uniform(*settings.voxel_scale, size=2) * anatomy.spacing
    # The last voxel axis is the slice axis, as in most acquisitions.
    spacing = np.array([in_plane, in_plane, thickness])
    ornt = nib.orientations.axcodes2ornt(tuple(orientation))
    rotation = np.zeros((3, 3))
    for j, (world_axis, flip) in enumerate(ornt):
        rotation[int(world_axis), j] = flip
    extent = np.asarray(anatomy.image.shape) * anatomy.spacing  # world extent per world axis
    native_extent = np.abs(rotation.T) @ extent
    shape = tuple(int(np.ceil(e / s)) for e, s in zip(native_extent, spacing))
    direction = rotation * spacing
    centre = anatomy.centre
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = centre - direction @ ((np.asarray(shape) - 1) / 2.0)

    head_rotation = Rotation.from_euler("xyz", rng.uniform(-1, 1, 3) * settings.rotation_deg, degrees=True)
    scale = rng.uniform(*settings.scale_range, size=3)
    forward = head_rotation.as_matrix() @ np.diag(scale)
    shift = rng.uniform(-1, 1, 3) * settings.shift_mm
    k = settings.control_points
    elastic = rng.normal(0.0, settings.elastic_mm, size=(3, k, k, k))
    # Zero displacement on the border control points keeps the head inside the field of view.
    border = np.ones((k, k, k), bool)
    border[1:-1, 1:-1, 1:-1] = False
    elastic[:, border] = 0.0
    return SubjectGeometry(shape, affine, np.linalg.inv(forward), shift, elastic, orientation)


def template_points(geometry: SubjectGeometry, anatomy: Anatomy) -> np.ndarray:
    """Template world coordinates (3, N) in mm of every native voxel (C order over `geometry.shape`)."""
    idx = np.indices(geometry.shape, dtype=np.float32).reshape(3, -1)
    world = geometry.affine[:3, :3] @ idx + geometry.affine[:3, 3:4]
    centre = anatomy.centre[:, None]
    points = centre + geometry.linear @ (world - centre - geometry.shift[:, None])
    return points + elastic_displacement(geometry.elastic, points, anatomy)


def elastic_displacement(control: np.ndarray, points: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Cubic interpolation (3, N) of control displacements (3, k, k, k) at template points (3, N) mm."""
    k = control.shape[1]
    vox = anatomy.world_to_voxel(points)
    coords = vox / (np.asarray(anatomy.image.shape)[:, None] - 1) * (k - 1)
    return np.stack([ndimage.map_coordinates(c, coords, order=3, mode="nearest") for c in control])


@dataclass(frozen=True)
class ResidualWarp:
    """A registration error: a smooth displacement (3, k, k, k) control field in mm (zero on the
    border control points, cubic interpolation as the elastic warp) scaled so that its largest
    displacement over the subject's brain is `magnitude_mm`. Added to a subject's pulled-back
    template points, it misplaces the anatomy (and the lesions with it) by what an affine or
    deformable registration would leave behind; it is applied while rendering, before bias and
    noise, so the scan's noise texture stays that of any other scan (resampling a rendered,
    noisy scan would smooth its noise where it moves and give it a signature of its own)."""

    control: np.ndarray
    magnitude_mm: float

    def apply(self, points: np.ndarray, anatomy: Anatomy) -> np.ndarray:
        """Template points (3, N) mm moved by the field, its largest move over the brain = `magnitude_mm`."""
        displacement = elastic_displacement(self.control, points, anatomy)
        inside = ndimage.map_coordinates(anatomy.brain_mask.astype(np.float32), anatomy.world_to_voxel(points),
                                         order=0, cval=0.0) > 0.5
        largest = float(np.linalg.norm(displacement[:, inside], axis=0).max()) if inside.any() else 0.0
        if largest == 0.0:
            return points
        return points + displacement * (self.magnitude_mm / largest)


def sample_residual(rng: np.random.Generator, magnitude_mm: tuple[float, float], control_points: int) -> ResidualWarp:
    """One subject's registration error: magnitude uniform in `magnitude_mm`, direction field random."""
    magnitude = float(rng.uniform(*magnitude_mm))
    k = control_points
    control = rng.normal(0.0, 1.0, size=(3, k, k, k))
    border = np.ones((k, k, k), bool)
    border[1:-1, 1:-1, 1:-1] = False
    control[:, border] = 0.0
    return ResidualWarp(control, magnitude)


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative bias (shape) float32: exp of a random quadratic polynomial, std ~`strength`."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = [x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3]
    coeffs = rng.normal(0.0, strength, len(terms)).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coeffs, terms))
    return np.exp(log_field).astype(np.float32)
