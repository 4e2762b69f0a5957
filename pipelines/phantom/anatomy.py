"""Template-space anatomy of a phantom cohort: a procedural head or the SRI-24 brain.

Every phantom subject is the same `Anatomy` seen through its own warp, so the anatomy is the
cohort's template. Intensities are T2-like (CSF bright, white matter dark, cortical bone dark)
because the published experiment screens T2-weighted scans.

Choices (not from the paper; a phantom only needs to be brain-like):
- The template grid is an isotropic cube of `size` voxels covering `FOV_MM` = 200 mm, so the
  voxel size is 200/size mm (`size=200` is 1 mm; the default 96 is about 2.1 mm, enough for
  cube edges up to ~84 after cropping to the brain).
- Procedural head: nested, gently perturbed ellipsoids (scalp, skull, CSF, cortex, white matter)
  with two lateral ventricles, a smooth multiplicative texture and a folded grey/white boundary.
  Its shape depends only on `size` (fixed internal seed), so cohorts of different seeds share
  one template, as real cohorts share one atlas.
- Normal variation (`AtrophySettings`): an older-looking healthy brain, the same head with
  lateral ventricles enlarged by a volume factor (each semi-axis times factor^(1/3); default 2.0)
  and the cortex thinned by `cortex_mm` (default 2 mm) at the brain's surface, deeper where the
  folding field dips (widened sulci), the lost grey matter replaced by CSF. The brain mask is the
  template's (CSF inside it), so the subject stays on the cohort's template.
- SRI-24 (or any template folder): its skull-stripped brain is resampled onto the template grid through its affine and
  inverted into a T2-like contrast inside the brain (`1.05 - 0.75 * T1 / p99`), clipped to [0, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from volumetric.errors import VolscanError

if TYPE_CHECKING:
    from preprocessing.template import Template

log = logging.getLogger(__name__)

FOV_MM = 200.0
_ANATOMY_SEED = 20240531
# Relative T2-like tissue levels (CSF = 1).
TISSUE_LEVELS = {"scalp": 0.55, "skull": 0.06, "csf": 1.0, "grey": 0.55, "white": 0.36}


@dataclass(frozen=True)
class AtrophySettings:
    """The normal-variation subgroup: `fraction` of the healthy subjects (0 = none) rendered from
    an atrophic head (procedural anatomy only): ventricle volume times `ventricle_factor`, cortex
    thinned by `cortex_mm`."""

    fraction: float = 0.0
    ventricle_factor: float = 2.0
    cortex_mm: float = 2.0

    def validate(self) -> None:
        """Raise VolscanError on settings that cannot make the subgroup."""
        if not 0.0 <= self.fraction <= 1.0:
            raise VolscanError(f"atrophy fraction must be within 0..1 (of the healthy subjects), got {self.fraction}")
        if not 1.0 <= self.ventricle_factor <= 3.0 or not 0.0 <= self.cortex_mm <= 6.0:
            raise VolscanError("ventricle factor must be within 1..3 (the two ventricles stay apart) and cortical atrophy within 0..6 mm, got "
                               f"{self.ventricle_factor} and {self.cortex_mm}")


@dataclass
class Anatomy:
    """Template-space anatomy.

    `image` (size, size, size) float32 T2-like intensities in [0, 1]; `brain_mask` same shape,
    bool; `affine` (4, 4) voxel -> world (mm, RAS); `source` says where it came from;
    `skull_stripped`: the image is brain only, so subjects are zero outside the brain (as
    skull-stripped releases such as BraTS are) instead of carrying background noise.
    """

    image: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    source: str
    skull_stripped: bool = False

    @property
    def spacing(self) -> float:
        """Isotropic voxel size in mm."""
        return float(abs(self.affine[0, 0]))

    @property
    def centre(self) -> np.ndarray:
        """World coordinate (mm) of the grid centre, shape (3,)."""
        half = (np.asarray(self.image.shape) - 1) / 2.0
        return self.affine[:3, :3] @ half + self.affine[:3, 3]

    def world_to_voxel(self, points: np.ndarray) -> np.ndarray:
        """Map world points (3, N) in mm to template voxel coordinates (3, N)."""
        inv = np.linalg.inv(self.affine)
        return inv[:3, :3] @ points + inv[:3, 3:4]


def template_affine(size: int, centre: np.ndarray | None = None) -> np.ndarray:
    """RAS affine (4, 4) of the isotropic `size`^3 template grid covering FOV_MM around `centre`."""
    spacing = FOV_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    affine[:3, 3] = centre - spacing * (size - 1) / 2.0
    return affine


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, float32 of `shape`."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return (field / max(float(field.std()), 1e-8)).astype(np.float32)


def procedural_head(size: int = 96, ventricle_factor: float = 1.0, cortex_mm: float = 0.0) -> Anatomy:
    """A procedural T2-like head on a `size`^3 grid (FOV 200 mm): scalp, skull, CSF, GM, WM, ventricles.

    `ventricle_factor` multiplies the lateral ventricles' volume and `cortex_mm` thins the cortex
    (normal variation, `AtrophySettings`); the defaults give the cohort template. Texture, folding
    and outline are the same draws for every setting."""
    if size < 32:
        raise VolscanError(f"phantom size must be at least 32 voxels, got {size}")
    rng = np.random.default_rng(_ANATOMY_SEED)
    affine = template_affine(size)
    spacing = FOV_MM / size
    axis = (np.arange(size) - (size - 1) / 2.0) * spacing
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    # Head semi-axes in mm (left-right, anterior-posterior, inferior-superior) and a smooth
    # bumpiness so the outline is not a perfect ellipsoid.
    bump = 0.025 * smooth_noise(rng, (size,) * 3, 12.0 / spacing)
    rho = np.sqrt((x / 68.0) ** 2 + ((y + 4.0) / 86.0) ** 2 + ((z - 4.0) / 74.0) ** 2) * (1.0 + bump)
    folding = 0.07 * smooth_noise(rng, (size,) * 3, 4.0 / spacing)
    texture = 1.0 + 0.06 * smooth_noise(rng, (size,) * 3, 2.5 / spacing)

    image = np.zeros((size,) * 3, np.float32)
    image[rho < 1.0] = TISSUE_LEVELS["scalp"]
    image[rho < 0.93] = TISSUE_LEVELS["skull"]
    image[rho < 0.87] = TISSUE_LEVELS["csf"]
    brain = rho < 0.84
    image[brain] = TISSUE_LEVELS["grey"]
    image[brain & (rho + folding < 0.70)] = TISSUE_LEVELS["white"]
    if cortex_mm > 0:
        # rho is ~1 at 76 mm (the mean head semi-axis); sulci widen where the folding field is high
        image[brain & (rho + 0.5 * np.maximum(folding, 0.0) >= 0.84 - cortex_mm / 76.0)] = TISSUE_LEVELS["csf"]
    stretch = ventricle_factor ** (1.0 / 3.0)
    for side in (-1.0, 1.0):
        vent = (((x - side * 9.0) / (6.0 * stretch)) ** 2 + ((y + 2.0) / (22.0 * stretch)) ** 2
                + ((z - 14.0) / (9.0 * stretch)) ** 2)
        image[vent < 1.0] = TISSUE_LEVELS["csf"]
    image *= texture
    return Anatomy(np.clip(image, 0.0, 1.2), rho < 0.87, affine, "procedural")


def atlas_brain(template: "Template", size: int = 96) -> Anatomy:
    """The template's skull-stripped brain resampled onto a `size`^3 grid centred on the brain, T2-like.

    `template` is a `preprocessing.template.Template` (image + brain mask on the image grid).
    """
    from preprocessing.resample import resample_to_grid

    mask_centre = np.argwhere(template.brain_mask).mean(axis=0)
    affine = template_affine(size, template.image.affine[:3, :3] @ mask_centre + template.image.affine[:3, 3])
    shape = (size,) * 3
    t1 = resample_to_grid(template.brain, template.image.affine, shape, affine, order=1)
    brain = resample_to_grid(template.brain_mask.astype(np.float32), template.image.affine, shape, affine,
                             order=0) > 0.5
    scale = float(np.percentile(t1[brain], 99)) if brain.any() else 1.0
    t2 = np.where(brain, np.clip(1.05 - 0.75 * t1 / max(scale, 1e-6), 0.0, 1.0), 0.0).astype(np.float32)
    return Anatomy(t2, brain, affine, f"atlas:{template.folder}", skull_stripped=True)


def load_atlas_anatomy(template_dir: str | Path | None, size: int = 96) -> Anatomy:
    """Anatomy from a template folder `preprocessing.template.resolve_template` accepts (None: the
    resolved default). Raises VolscanError when no template can be resolved."""
    from preprocessing.template import resolve_template

    return atlas_brain(resolve_template(template_dir), size)
