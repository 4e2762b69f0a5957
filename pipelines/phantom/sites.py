"""Scanner sites of a phantom cohort: each site's intensity scale, response curve, noise, blur and bias.

Real healthy cohorts come from several scanners (IXI: three hospitals), and each leaves its own
mark on every scan it makes: a different int16 range, a different contrast between tissues,
noise, resolution and coil inhomogeneity. Scans of one site vouch for each other in mutual
scoring, so a site is a group of *healthy* scans that a detector must not take for a lesion group.

Without site profiles (`PhantomConfig.site_profiles = None`, the default) sites differ only in
their intensity scale (drawn log-uniformly in `PhantomConfig.site_scale`) and every scan has the
cohort's noise and bias strength. With `SiteSettings`, each site also draws, from its own random
stream (so the subjects' streams are unchanged):

- `gamma`: the intensity response `v -> v ** gamma` (relative levels, CSF = 1), a site-specific
  contrast between tissues (white matter 0.36 becomes 0.36 ** gamma); default 0.8-1.25;
- `noise`: Rician sigma relative to CSF; default 0.02-0.06 (the cohort default is 0.03);
- `blur_mm`: Gaussian point spread, full width at half maximum in mm (lower resolution);
  default 0-2.5 mm;
- `bias`: bias-field strength; default 0.05-0.3 (cohort default 0.15).

Subjects are then assigned to sites in turn (subject index modulo the number of sites), so every
site holds its share of every group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from volumetric.errors import VolscanError

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class SiteSettings:
    """Ranges each site's acquisition is drawn from (uniform; see the module docstring)."""

    gamma: tuple[float, float] = (0.8, 1.25)
    noise: tuple[float, float] = (0.02, 0.06)
    blur_mm: tuple[float, float] = (0.0, 2.5)
    bias: tuple[float, float] = (0.05, 0.3)

    def validate(self) -> None:
        """Raise VolscanError on ranges that cannot draw a site."""
        for name in ("gamma", "noise", "blur_mm", "bias"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name == "gamma" and lo == 0):
                raise VolscanError(f"site {name.replace('_', ' ')} range must satisfy 0 <= min <= max "
                                   f"(gamma > 0), got {lo}..{hi}")


@dataclass(frozen=True)
class Site:
    """One scanner: `scale` (CSF in scanner units), `gamma` (response exponent), `noise` (Rician
    sigma relative to CSF), `blur_mm` (Gaussian FWHM), `bias` (bias-field strength)."""

    scale: float
    gamma: float = 1.0
    noise: float = 0.03
    blur_mm: float = 0.0
    bias: float = 0.15

    def to_dict(self) -> dict:
        """JSON-ready dict, rounded."""
        return {key: round(float(value), 4) for key, value in asdict(self).items()}

    def respond(self, image: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
        """The noiseless relative image (X, Y, Z) float32 (CSF = 1) as this scanner sees it: the
        response curve, then the point spread (`spacing_mm` (3,) the native voxel size). A new
        array; unchanged values where gamma is 1 and blur 0."""
        out = image
        if self.gamma != 1.0:
            out = np.power(np.clip(out, 0.0, None), self.gamma, dtype=np.float32)
        if self.blur_mm > 0:
            sigma = self.blur_mm / FWHM_PER_SIGMA / np.asarray(spacing_mm, dtype=float)
            out = ndimage.gaussian_filter(out.astype(np.float32), sigma, mode="nearest")
        return np.asarray(out, dtype=np.float32)


def draw_sites(rng: np.random.Generator, scales: np.ndarray, settings: SiteSettings | None, noise: float,
               bias: float) -> list[Site]:
    """One `Site` per entry of `scales` (n_sites,): the cohort's `noise` and `bias` for all when
    `settings` is None (no draw from `rng`), else each site's profile drawn from `settings`."""
    if settings is None:
        return [Site(float(s), noise=noise, bias=bias) for s in scales]
    return [Site(float(s), gamma=float(rng.uniform(*settings.gamma)), noise=float(rng.uniform(*settings.noise)),
                 blur_mm=float(rng.uniform(*settings.blur_mm)), bias=float(rng.uniform(*settings.bias)))
            for s in scales]
