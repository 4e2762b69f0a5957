"""Affine registration of a volume to the template with SimpleITK (rigid, then affine).

Both stages: Mattes mutual information (works across contrasts, e.g. T2 onto a T1 template),
multi-resolution pyramid, regular-step gradient descent with physical-shift scaling, and a
centred initialisation (image moments). Defaults are chosen for speed on a 2-core CPU, which
the papers do not pin down:

- `working_spacing_mm=2.0`: both images are smoothed and resampled once to 2 mm before the
  pyramid. An affine transform has 12 parameters and is fixed well at 2 mm; ITK would otherwise
  smooth the full 1 mm images at every level of both stages, which dominated the run time.
- `shrink_factors=(4, 2, 1)`, `smoothing_mm=(4, 2, 0)`: levels at 8, 4 and 2 mm.
- `sampling_fraction=0.05` random samples (~50k at 2 mm) drawn with a fixed `seed=1` (ITK
  treats 0 as "seed from the wall clock"), but at least `min_samples=20000` per
  level: the coarse levels have few voxels, and too few samples there send the optimiser into a
  wrong basin (seen across contrasts).
- `threads=1`: ITK's multi-threaded Mattes metric adds per-thread partial sums in a varying
  order, so two runs differ by ~0.002 mm; one thread makes reruns bit-identical, and a cohort
  is better parallelised over volumes (processes) than inside one registration.
- `histogram_bins=32`: the usual Mattes choice (ANTs/BRAINSFit defaults are 32).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from preprocessing.io import to_sitk
from preprocessing.resample import sitk_transform_to_ras

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationSettings:
    """Hyper-parameters of `register_affine` (see the module docstring for why these defaults)."""

    working_spacing_mm: float = 2.0
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    histogram_bins: int = 32
    sampling_fraction: float = 0.05
    min_samples: int = 20000
    rigid_iterations: int = 100
    affine_iterations: int = 100
    learning_rate: float = 1.0
    initialization: str = "moments"
    seed: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        from volumetric.errors import VolscanError

        if len(self.shrink_factors) != len(self.smoothing_mm) or not self.shrink_factors:
            raise VolscanError("registration shrink_factors and smoothing_mm need the same, non-zero length")
        if not self.working_spacing_mm > 0:
            raise VolscanError(f"registration working_spacing_mm must be > 0, got {self.working_spacing_mm}")
        if not 0 < self.sampling_fraction <= 1:
            raise VolscanError(f"registration sampling_fraction must be in (0, 1], got {self.sampling_fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 1:
            raise VolscanError(f"registration seed must be an integer >= 1 (ITK reads 0 as 'wall clock'), got {self.seed!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise VolscanError(f"registration threads must be an integer >= 1, got {self.threads!r}")
        if self.initialization not in ("moments", "geometry"):
            raise VolscanError(f"registration initialization must be 'moments' or 'geometry', got {self.initialization!r}")

    def key(self) -> dict:
        """Settings as a JSON-able dict (part of cache keys)."""
        return asdict(self)


def prepare_image(array: np.ndarray, affine: np.ndarray, settings: RegistrationSettings) -> sitk.Image:
    """SimpleITK image of `array` (X, Y, Z) with RAS `affine`, smoothed and resampled to the working spacing.

    Prepare the template once and reuse it for every subject.
    """
    return _downsample(to_sitk(np.asarray(array, dtype=np.float32), affine), settings.working_spacing_mm)


def register_affine(
    moving: sitk.Image, fixed: sitk.Image, settings: RegistrationSettings = RegistrationSettings()
) -> np.ndarray:
    """Affine map from template (`fixed`) world to input (`moving`) world, (4, 4) in RAS mm.

    Both images come from `prepare_image`. The returned matrix takes a template point to the
    corresponding input point, i.e. the transform a resampler needs to pull the input into
    template space.
    """
    init = (
        sitk.CenteredTransformInitializerFilter.MOMENTS
        if settings.initialization == "moments"
        else sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), init)
    rigid = _run_stage(fixed, moving, rigid, settings, settings.rigid_iterations)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine = _run_stage(fixed, moving, affine, settings, settings.affine_iterations)
    return sitk_transform_to_ras(affine)


def _run_stage(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings, iterations: int
) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    size = np.asarray(fixed.GetSize())
    fractions = [
        float(min(1.0, max(settings.sampling_fraction, settings.min_samples / np.prod(np.ceil(size / f)))))
        for f in settings.shrink_factors
    ]
    method.SetMetricSamplingPercentagePerLevel(fractions, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=1e-4,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=False)
    # The metric ignores the method's own thread count; ITK reads the global default.
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    try:
        result = method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    log.debug(
        "%s stage: metric %.4f after %d iterations (%s)",
        transform.GetName(),
        method.GetMetricValue(),
        method.GetOptimizerIteration(),
        method.GetOptimizerStopConditionDescription(),
    )
    # Execute returns a composite wrapping the optimised copy; unwrap to the plain transform.
    if isinstance(result, sitk.CompositeTransform) or result.GetName() == "CompositeTransform":
        result = sitk.CompositeTransform(result).GetNthTransform(0)
    return result.Downcast()


def _downsample(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Anti-aliased resampling to `spacing_mm` along the image's own axes (never upsamples)."""
    old = np.asarray(image.GetSpacing())
    new = np.maximum(old, spacing_mm)
    if np.allclose(new, old):
        return image
    # Gaussian with FWHM ~ the new voxel size, minus the blur the old voxels already carry.
    sigma = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355
    # One axis at a time, skipping those already at or above the working spacing (sigma 0, e.g.
    # 2.4 mm slices): ITK's Gaussian filters refuse a zero sigma. Along the others this equals
    # `SmoothingRecursiveGaussian` (the same recursive filter per axis, to float32 rounding).
    smooth = sitk.Cast(image, sitk.sitkFloat32)
    for axis in np.flatnonzero(sigma > 0):
        smooth = sitk.RecursiveGaussian(smooth, float(sigma[axis]), False,
                                        sitk.RecursiveGaussianImageFilter.ZeroOrder, int(axis))
    size = np.maximum(np.round(np.asarray(image.GetSize()) * old / new), 1).astype(int)
    # Keep the physical extent centred: the first new voxel centre sits half a new voxel inside.
    origin = image.TransformContinuousIndexToPhysicalPoint(((new / old - 1) / 2).tolist())
    return sitk.Resample(
        smooth, size.tolist(), sitk.Transform(), sitk.sitkLinear, origin, new.tolist(), image.GetDirection(),
        0.0, sitk.sitkFloat32,
    )
