"""Metastasis-like lesions defined in template space: necrotic core, enhancing rim, edema.

A lesion is an analytic, irregular blob: an ellipsoid whose radius is modulated by a few random
angular harmonics, split radially into core / rim / edema. It is evaluated at template world
coordinates, so it can be rendered exactly at any subject's pulled-back voxel positions (see
`warps.py`). Labels follow the BraTS convention: 1 = necrotic / non-enhancing core, 2 = edema
(SNFH), 3 = enhancing rim; 0 elsewhere. Lesions are clipped to the brain mask.

Defaults (chosen; T2-like appearance of a metastasis relative to the phantom's tissue levels):
outer (edema) radius 7-16 mm, axis ratios 0.75-1.25, core at 25-40 % and rim at 45-60 % of the
outer radius, edema 0.78-0.92, rim 0.28-0.42, core 0.95-1.1 (CSF = 1, white matter 0.36), a
1.5 mm soft edge, centre at least 0.7 radii inside the brain.

Contrast (`LesionSettings.contrast`, a multiplier of the three levels; CSF = 1):
- 0.7, subtle: edema 0.55-0.64 (grey matter is 0.55), core 0.67-0.77 (below CSF);
- 1.0, T2-like (default): edema between grey matter and CSF, core about as bright as CSF;
- 1.5, clearly brighter than CSF: edema 1.17-1.38, core 1.43-1.65.
Polarity (`LesionSettings.polarity`): "bright" (default, the levels above) or "dark", each
level v (after the contrast) replaced by WM^2 / v with WM = white matter's 0.36: as much darker
than white matter as the bright lesion is brighter (edema 0.14-0.17, core 0.12-0.14 at contrast
1.0: a T1-hypointense-like lesion), so a detector can be checked on both signs.
Look-alike lesions (`sample_lesion(..., appearance=...)`) share one appearance (the three
levels and the core / rim fractions) and differ in place, size, elongation, rotation and outline,
as metastases of one primary tumour look alike in one modality wherever they grow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from volumetric.errors import VolscanError

from .anatomy import TISSUE_LEVELS, Anatomy

LABEL_CORE, LABEL_EDEMA, LABEL_RIM = 1, 2, 3
POLARITIES = ("bright", "dark")


@dataclass(frozen=True)
class LesionSettings:
    """Ranges lesions are drawn from (see module docstring for why these defaults)."""

    radius_mm: tuple[float, float] = (7.0, 16.0)
    axis_ratio: tuple[float, float] = (0.75, 1.25)
    core_fraction: tuple[float, float] = (0.25, 0.40)
    rim_fraction: tuple[float, float] = (0.45, 0.60)
    edema_level: tuple[float, float] = (0.78, 0.92)
    rim_level: tuple[float, float] = (0.28, 0.42)
    core_level: tuple[float, float] = (0.95, 1.10)
    harmonics: int = 4
    irregularity: float = 0.12
    edge_mm: float = 1.5
    contrast: float = 1.0
    polarity: str = "bright"

    def level(self, value: float) -> float:
        """A drawn level after contrast and polarity ("dark": WM^2 / v, mirrored around white matter)."""
        value *= self.contrast
        return TISSUE_LEVELS["white"] ** 2 / value if self.polarity == "dark" else value

    def validate(self) -> None:
        """Raise VolscanError on ranges that cannot draw a lesion."""
        for name in ("radius_mm", "axis_ratio", "core_fraction", "rim_fraction", "edema_level", "rim_level",
                     "core_level"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise VolscanError(f"lesion {name.replace('_', ' ')} must satisfy 0 < min <= max, got {lo}..{hi}")
        if not self.contrast > 0:
            raise VolscanError(f"lesion contrast must be > 0, got {self.contrast}")
        if self.polarity not in POLARITIES:
            raise VolscanError(f"lesion polarity must be one of {', '.join(POLARITIES)}, got {self.polarity!r}")


@dataclass(frozen=True)
class Lesion:
    """One lesion in template world space (mm). Plain lists so it round-trips through JSON."""

    centre_mm: list[float]
    radius_mm: float
    axes: list[float]
    rotation: list[list[float]]
    core_fraction: float
    rim_fraction: float
    levels: dict[str, float]
    harmonic_vectors: list[list[float]]
    harmonic_amplitudes: list[float]
    harmonic_phases: list[float]
    edge_mm: float

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def sample_lesion(rng: np.random.Generator, anatomy: Anatomy, settings: LesionSettings,
                  inner_distance_mm: np.ndarray | None = None, appearance: Lesion | None = None) -> Lesion:
    """Draw one lesion placed inside `anatomy`'s brain.

    `inner_distance_mm` (size^3) is the distance to the brain border; pass it when drawing many
    lesions so it is computed once. `appearance`: a lesion whose levels and core / rim fractions
    the new one copies (a look-alike); everything else is drawn (the same random draws either way).
    """
    if inner_distance_mm is None:
        inner_distance_mm = brain_depth(anatomy)
    radius = float(rng.uniform(*settings.radius_mm))
    candidates = np.argwhere(inner_distance_mm >= 0.7 * radius)
    if len(candidates) == 0:
        raise VolscanError(f"no room for a {radius:.1f} mm lesion inside the phantom brain; lower the lesion radius")
    voxel = candidates[rng.integers(len(candidates))].astype(float)
    voxel += rng.uniform(-0.5, 0.5, 3)
    centre = anatomy.affine[:3, :3] @ voxel + anatomy.affine[:3, 3]
    directions = rng.normal(size=(settings.harmonics, 3))
    directions *= rng.uniform(1.0, 3.0, (settings.harmonics, 1)) / np.linalg.norm(directions, axis=1, keepdims=True)
    lesion = Lesion(
        centre_mm=centre.round(4).tolist(),
        radius_mm=round(radius, 4),
        axes=rng.uniform(*settings.axis_ratio, 3).round(4).tolist(),
        rotation=Rotation.random(random_state=rng).as_matrix().round(6).tolist(),
        core_fraction=round(float(rng.uniform(*settings.core_fraction)), 4),
        rim_fraction=round(float(rng.uniform(*settings.rim_fraction)), 4),
        levels={"edema": round(settings.level(float(rng.uniform(*settings.edema_level))), 4),
                "rim": round(settings.level(float(rng.uniform(*settings.rim_level))), 4),
                "core": round(settings.level(float(rng.uniform(*settings.core_level))), 4)},
        harmonic_vectors=directions.round(4).tolist(),
        harmonic_amplitudes=(rng.uniform(0.3, 1.0, settings.harmonics) * settings.irregularity
                             / np.sqrt(settings.harmonics)).round(4).tolist(),
        harmonic_phases=rng.uniform(0, 2 * np.pi, settings.harmonics).round(4).tolist(),
        edge_mm=settings.edge_mm,
    )
    if appearance is None:
        return lesion
    return replace(lesion, levels=dict(appearance.levels), core_fraction=appearance.core_fraction,
                   rim_fraction=appearance.rim_fraction)


def brain_depth(anatomy: Anatomy) -> np.ndarray:
    """Distance in mm from each template voxel to the nearest non-brain voxel (size^3 float)."""
    return ndimage.distance_transform_edt(anatomy.brain_mask, sampling=anatomy.spacing)


def render_lesion(lesion: Lesion, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate `lesion` at template world points (3, N) in mm.

    Returns `labels` (N,) uint8 (0/1/2/3), `alpha` (N,) float32 in [0, 1] (how much the lesion
    replaces the tissue; soft over `edge_mm` at the outer border) and `level` (N,) float32 (the
    lesion's T2-like intensity where alpha > 0).
    """
    n = points.shape[1]
    labels = np.zeros(n, np.uint8)
    alpha = np.zeros(n, np.float32)
    level = np.zeros(n, np.float32)
    centre = np.asarray(lesion.centre_mm)[:, None]
    axes = np.asarray(lesion.axes)
    reach = lesion.radius_mm * axes.max() * (1.5 + sum(lesion.harmonic_amplitudes)) + lesion.edge_mm
    near = np.flatnonzero((np.abs(points - centre) <= reach).all(axis=0))
    if near.size == 0:
        return labels, alpha, level
    local = np.asarray(lesion.rotation).T @ (points[:, near] - centre) / (lesion.radius_mm * axes[:, None])
    radius = np.linalg.norm(local, axis=0)
    unit = local / np.maximum(radius, 1e-9)
    wobble = 1.0 + sum(a * np.cos(np.pi * np.asarray(v) @ unit + p) for v, a, p in
                       zip(lesion.harmonic_vectors, lesion.harmonic_amplitudes, lesion.harmonic_phases))
    depth = radius / wobble  # 1 at the lesion border
    edge = lesion.edge_mm / lesion.radius_mm
    labels[near] = np.select([depth < lesion.core_fraction, depth < lesion.rim_fraction, depth < 1.0],
                             [LABEL_CORE, LABEL_RIM, LABEL_EDEMA], 0)
    alpha[near] = np.clip((1.0 - depth) / edge + 0.5, 0.0, 1.0)
    level[near] = np.select([depth < lesion.core_fraction, depth < lesion.rim_fraction],
                            [lesion.levels["core"], lesion.levels["rim"]], lesion.levels["edema"])
    return labels, alpha, level
