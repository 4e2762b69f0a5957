"""N4 bias-field correction (SimpleITK's `N4BiasFieldCorrectionImageFilter`) inside the brain mask.

MR scans carry a smooth multiplicative intensity field from the receive coils. Nyúl
standardisation is global (one piecewise-linear map per scan), so it cannot remove it, and the
mutual scoring then reads a strongly biased healthy scan as a consistent anomaly: CoDeGraph's
lesion-free phantom cohorts flag exactly the strongest-biased scans (docs/results/2026-11-30-codegraph-cube224.md,
"Lesion-free false flags are the phantom's bias field"). N4 (Tustison et al. 2010) fits the log field as a
B-spline on a shrunken copy of the image, then divides the full-resolution image by it.

The fit uses only brain voxels with positive intensity (N4 works on log intensities); voxels
outside the mask are divided by the same smooth field (they are voided later anyway).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

# `PreprocessSettings.bias_correction` values: "auto" (N4 unless the input is registered and
# skull-stripped), "none" (the paper's BraTS protocol) or "n4".
# N4 needs a fit region: with fewer positive brain voxels than this share the input is not an MR
# magnitude image (z-scored or CT-like intensities) and the log-domain model does not apply.
MIN_POSITIVE_SHARE = 0.5
# Voxels per axis the shrunken fit image keeps at least. At 12-16 voxels per axis (a 48³ cube
# shrunk 4x) the last control grid (4 spans with the default 3 levels) also absorbs the tissue
# pattern and the correction is poorer (48³/64³ textured test phantoms, 3 levels,
# docs/preprocessing.md: log-bias std cut 3.7-7.4x at 12-16 voxels, 7.1-10.9x at >= 32).
# A 224³ cube keeps the full shrink of 4.
MIN_SHRUNK_VOXELS = 32


@dataclass(frozen=True)
class N4Settings:
    """N4 options (defaults: ANTs' `N4BiasFieldCorrection` practice for 1 mm brain images).

    - `shrink`: fit on the image shrunk by this factor per axis (speed; the field is smooth),
      reduced where needed so the shrunken image keeps `MIN_SHRUNK_VOXELS` per axis;
    - `iterations`: iterations per fitting level (one level per entry, control grid doubled each).
      Three levels, not ANTs' four: against known fields (`benchmarks/bias_field.py`,
      docs/preprocessing.md) the fourth level's finer grid absorbs anatomy and lesions (field
      left on 224^3 phantoms: median 0.022 vs 0.012 with three levels; on the SRI-24 T1 0.031
      vs 0.023; a 64 mm lesion loses 20 % of its intensity vs 5 %);
    - `control_points`: initial B-spline control points per axis (>= spline order + 1 = 4);
    - `convergence`: stop a level when the field changes less than this;
    - `threads`: ITK threads of the fit and of the field's evaluation. The result depends on the
      thread count (1 vs 2 or 4: up to 1e-5 in the log field of a 64³ phantom), so 1 (as the
      registration) makes reruns bit-identical on any machine, and `--workers N` / Ray runs do
      not oversubscribe their cores.
    """

    shrink: int = 4
    iterations: tuple[int, ...] = (50, 50, 50)
    control_points: int = 4
    convergence: float = 1e-3
    threads: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, int) or self.shrink < 1:
            raise VolscanError(f"N4 shrink must be an integer >= 1, got {self.shrink!r}")
        iterations = tuple(self.iterations) if isinstance(self.iterations, (list, tuple)) else None
        if not iterations or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in iterations):
            raise VolscanError(f"N4 iterations must be a list of integers >= 1 (one per level), got {self.iterations!r}")
        object.__setattr__(self, "iterations", iterations)
        if isinstance(self.control_points, bool) or not isinstance(self.control_points, int) or self.control_points < 4:
            raise VolscanError(f"N4 control_points must be an integer >= 4, got {self.control_points!r}")
        if (isinstance(self.convergence, bool) or not isinstance(self.convergence, (int, float))
                or not math.isfinite(self.convergence) or not self.convergence > 0):
            raise VolscanError(f"N4 convergence must be a number > 0, got {self.convergence!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise VolscanError(f"N4 threads must be an integer >= 1, got {self.threads!r}")

    def key(self) -> dict:
        """Settings as a JSON-able dict (part of cache keys)."""
        return asdict(self)


def n4_log_field(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 settings: N4Settings = N4Settings(), name: str = "volume") -> np.ndarray:
    """The N4 log bias field of `image` (X, Y, Z) fitted on `mask` (X, Y, Z) bool, same shape, float32.

    `spacing`: voxel size in mm per axis. It only sets the image metadata: N4's control grid is a
    number of points per axis over the image's extent, so each span is the box extent / spans per
    axis whatever the spacing, and the fitted field does not change with it beyond rounding.
    An `InputFileError` naming `name` when the brain holds too few positive voxels to fit.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape != mask.shape:
        raise VolscanError(f"{name}: N4 needs a 3D image and a mask of its shape, got {image.shape} and {mask.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise VolscanError(f"{name}: N4 needs three voxel sizes > 0 (mm), got {spacing}")
    fit = mask & (image > 0) & np.isfinite(image)
    if fit.sum() < MIN_POSITIVE_SHARE * max(int(mask.sum()), 1) or not fit.any():
        raise InputFileError(name, f"N4 bias correction needs positive MR intensities in the brain; {int(fit.sum())} "
                                   f"of {int(mask.sum())} brain voxels are > 0 (use --bias-correction none)")
    # SimpleITK reads numpy arrays as (z, y, x): transpose so that its x axis is our first axis.
    full = sitk.GetImageFromArray(np.where(fit, image, 0).astype(np.float32).transpose(2, 1, 0).copy())
    full.SetSpacing(spacing)
    fit_image = sitk.GetImageFromArray(fit.astype(np.uint8).transpose(2, 1, 0).copy())
    fit_image.CopyInformation(full)
    shrink = [min(settings.shrink, max(n // MIN_SHRUNK_VOXELS, 1)) for n in full.GetSize()]
    small = sitk.Shrink(full, shrink)
    small_mask = sitk.Shrink(fit_image, shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.iterations))
    corrector.SetNumberOfControlPoints([settings.control_points] * 3)
    corrector.SetConvergenceThreshold(float(settings.convergence))
    corrector.SetNumberOfThreads(settings.threads)
    # Its inner filters (and the field's evaluation) read the global default: pinned too (measured:
    # the filter's own count alone leaves the output dependent on the global one).
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    try:
        corrector.Execute(small, small_mask)
        log.debug("%s: N4 on a %s grid (shrink %s), %s iterations at the last level", name, small.GetSize(), shrink,
                  corrector.GetElapsedIterations())
        field = corrector.GetLogBiasFieldAsImage(full)  # B-spline evaluated on the full-resolution grid
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    return sitk.GetArrayFromImage(field).transpose(2, 1, 0).astype(np.float32)


def correct_bias_field(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       settings: N4Settings = N4Settings(), name: str = "volume") -> np.ndarray:
    """`image` (X, Y, Z) divided by its N4 bias field fitted in `mask`; float32, a new array.

    The field is rescaled to geometric mean 1 over the brain, so brain intensities keep their
    overall level (Nyúl follows anyway) and only the smooth spatial variation goes.
    """
    log_field = n4_log_field(image, mask, spacing, settings, name)
    log_field -= np.float32(log_field[np.asarray(mask, dtype=bool)].mean())
    return (np.asarray(image, dtype=np.float32) * np.exp(-log_field)).astype(np.float32)
