"""Registration recovers known affines (SRI-24 at 4 mm warped in code), also across contrasts."""

from __future__ import annotations

import numpy as np
import pytest
from test_preprocessing_data import dice, known_affine, small_template, warped_copy

from preprocessing.io import Volume, from_sitk
from preprocessing.settings import PreprocessSettings
from preprocessing.volume import VolumePreprocessor
from preprocessing.registration import RegistrationSettings, prepare_image, register_affine
from preprocessing.resample import resample_to_grid
from volumetric.errors import VolscanError


@pytest.fixture(scope="module")
def template(sri24_dir, tmp_path_factory):
    return small_template(sri24_dir, tmp_path_factory.mktemp("template"))


def _centre(template):
    affine, shape = template.image.affine, np.array(template.image.array.shape)
    return affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]


def _corner_error_mm(residual, centre):
    """Largest displacement (mm) by `residual` (4, 4) of the corners of a brain-sized box; one 4 mm voxel allowed."""
    corners = np.array([[x, y, z, 1.0] for x in (-65, 65) for y in (-85, 85) for z in (-65, 65)])
    corners[:, :3] += centre
    return np.linalg.norm((residual @ corners.T).T[:, :3] - corners[:, :3], axis=1).max()


@pytest.mark.parametrize(
    "degrees, scale, shift",
    [((8.0, -6.0, 10.0), 1.06, (6.0, -5.0, 4.0)), ((-12.0, 4.0, -5.0), 0.93, (-8.0, 3.0, -6.0))],
)
def test_registration_recovers_known_affine(template, degrees, scale, shift):
    truth = known_affine(degrees, scale, shift, centre=_centre(template))
    image, mask, affine = warped_copy(template, truth, codes="PIR")
    settings = RegistrationSettings()
    fixed = prepare_image(template.image.array, template.image.affine, settings)
    found = register_affine(prepare_image(image, affine, settings), fixed, settings)
    # found: template → input; truth: input → template; their product is the identity.
    assert _corner_error_mm(found @ truth, _centre(template)) < 4.0
    back = resample_to_grid(mask, affine, template.brain_mask.shape, template.image.affine, world=found, order=0)
    assert dice(back, template.brain_mask) >= 0.95


def test_registration_across_contrasts(template):
    """A T2-like copy (tissue intensities inverted, background dark) still lands on the T1 template."""
    truth = known_affine((5.0, 7.0, -9.0), 1.04, (4.0, 6.0, -3.0), centre=_centre(template))
    image, mask, affine = warped_copy(template, truth, codes="LPS")
    head = image > 0.05 * image.max()
    t2_like = np.where(head, 1.2 * image.max() - image, 0).astype(np.float32)
    pre = VolumePreprocessor(PreprocessSettings(size=28, brain_mask="template"), template)
    found = pre(Volume(t2_like, affine)).mapping.template_to_native
    assert _corner_error_mm(found @ truth, _centre(template)) < 4.0
    back = resample_to_grid(mask, affine, template.brain_mask.shape, template.image.affine, world=found, order=0)
    assert dice(back, template.brain_mask) >= 0.95


def test_registration_is_deterministic(template):
    image, _, affine = warped_copy(template, known_affine(centre=_centre(template)))
    settings = RegistrationSettings()
    fixed = prepare_image(template.image.array, template.image.affine, settings)
    moving = prepare_image(image, affine, settings)
    np.testing.assert_array_equal(register_affine(moving, fixed, settings), register_affine(moving, fixed, settings))


def test_bad_registration_settings():
    with pytest.raises(VolscanError, match="sampling_fraction"):
        RegistrationSettings(sampling_fraction=0)
    with pytest.raises(VolscanError, match="same, non-zero length"):
        RegistrationSettings(shrink_factors=(4, 2), smoothing_mm=(1.0,))


def _anisotropic(spacing: tuple[float, float, float], shape=(24, 26, 14), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random volume (X, Y, Z) float32 on an axis-aligned grid with `spacing` mm."""
    array = np.random.default_rng(seed).random(shape).astype(np.float32)
    return array, np.diag([*spacing, 1.0])


def test_prepare_image_keeps_axes_already_coarser_than_the_working_spacing():
    """2.4 mm slices, 1.9 mm in-plane (a 96^3 phantom's grid): the slice axis needs no blur (sigma 0,
    which ITK refuses); in-plane is blurred and resampled to 2 mm, the slices are kept as they are."""
    array, affine = _anisotropic((1.9, 1.9, 2.4))
    array[:] = np.random.default_rng(1).random(array.shape[2])  # constant in-plane, random along the slices
    image = prepare_image(array, affine, RegistrationSettings(working_spacing_mm=2.0))
    assert image.GetSpacing() == pytest.approx((2.0, 2.0, 2.4))
    assert image.GetSize() == (23, 25, 14)
    out = from_sitk(image)[0]
    np.testing.assert_allclose(out, np.broadcast_to(array[:1, :1, :], out.shape), rtol=0, atol=1e-5)


def test_prepare_image_blur_matches_a_plain_gaussian_per_axis():
    """Mixed spacing: per-axis Gaussian (scipy, sigma in voxels; none along the coarse axis), sampled
    at the new voxel centres, equals the ITK result inside the volume (recursive filter: ~1e-3)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    old, new = np.array([1.0, 1.25, 3.0]), np.array([2.0, 2.0, 3.0])
    array, affine = _anisotropic(tuple(old))
    image = prepare_image(array, affine, RegistrationSettings(working_spacing_mm=2.0))
    sigma_vox = np.sqrt(np.maximum(new**2 - old**2, 0)) / 2.355 / old
    blurred = gaussian_filter(array.astype(np.float64), sigma_vox, mode="nearest", truncate=6)
    size = np.array(image.GetSize())
    # New voxel j sits at old continuous index (new / old - 1) / 2 + j * new / old.
    grid = np.meshgrid(*[(n / o - 1) / 2 + np.arange(s) * n / o for n, o, s in zip(new, old, size)], indexing="ij")
    expected = map_coordinates(blurred, grid, order=1)
    inner = (slice(3, -3), slice(3, -3), slice(None))
    np.testing.assert_allclose(from_sitk(image)[0][inner], expected[inner], atol=2e-3)
