"""Phantom options for small metastases: small lesion radii, many lesions per scan, and a
registration error (a residual warp); cohorts without them keep their files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.phantom import LesionSettings, PhantomConfig, WarpSettings, generate_cohort
from pipelines.phantom.anatomy import procedural_head
from pipelines.phantom.cohort import build_anatomy
from pipelines.phantom.warps import ResidualWarp, elastic_displacement, sample_residual
from volumetric.errors import VolscanError

NO_WARP = WarpSettings(rotation_deg=0.0, scale_range=(1.0, 1.0), shift_mm=0.0, elastic_mm=0.0)
SMALL_LESIONS = PhantomConfig(n_normal=2, n_lesion=1, n_consistent=0, n_lookalike=2, seed=7, size=40,
                              template="procedural", lesions=LesionSettings(radius_mm=(2.0, 5.0)),
                              lookalike_lesions=(1, 5))


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_a_cohort_without_the_new_options_keeps_its_files(tmp_path):
    # The registration error draws from its own random stream, spawned after every other: with a
    # zero magnitude it moves nothing, so its cohort equals the one without the option voxel for
    # voxel (equal on any CPU, unlike a pinned digest of float work) and the subjects' own
    # streams are untouched.
    cohort = generate_cohort(tmp_path / "c", SMALL_LESIONS, progress=False)
    zero = generate_cohort(tmp_path / "z", replace(SMALL_LESIONS, registration_error_mm=(0.0, 0.0)), progress=False)
    plain, still = _arrays(cohort.root), _arrays(zero.root)
    assert plain.keys() == still.keys() and len(plain) >= 10
    for name, array in plain.items():
        np.testing.assert_array_equal(array, still[name], err_msg=name)
    assert all("registration_error_mm" not in m for m in cohort.info["subjects"].values())
    # small lesions, one to five per look-alike scan, as drawn
    radii = [les["radius_mm"] for m in cohort.info["subjects"].values() for les in m["lesions"]]
    assert radii and all(2.0 <= r <= 5.0 for r in radii)
    counts = [len(cohort.info["subjects"][s]["lesions"]) for s in cohort.members("lookalike")]
    assert all(1 <= c <= 5 for c in counts)


def test_residual_warp_moves_brain_points_by_at_most_its_magnitude():
    anatomy = procedural_head(40)
    residual = sample_residual(np.random.default_rng(3), (6.0, 6.0), 5)
    assert residual.magnitude_mm == 6.0
    points = anatomy.affine[:3, :3] @ np.indices(anatomy.image.shape).reshape(3, -1) + anatomy.affine[:3, 3:4]
    moved = residual.apply(points, anatomy)
    shift = np.linalg.norm(moved - points, axis=0)
    inside = anatomy.brain_mask.reshape(-1)
    assert shift[inside].max() == pytest.approx(6.0, rel=1e-6)
    # the direction field is the elastic warp's interpolation of the control points, scaled
    field = elastic_displacement(residual.control, points, anatomy)
    scale = 6.0 / np.linalg.norm(field[:, inside], axis=0).max()
    np.testing.assert_allclose(moved - points, field * scale, rtol=1e-6, atol=1e-9)
    assert np.array_equal(ResidualWarp(np.zeros((3, 5, 5, 5)), 4.0).apply(points, anatomy), points)


def test_registration_error_misplaces_anatomy_and_lesions_together(tmp_path):
    config = replace(SMALL_LESIONS, warps=NO_WARP, lesions=LesionSettings(radius_mm=(8.0, 10.0)), size=48)
    plain = generate_cohort(tmp_path / "plain", config, progress=False)
    moved = generate_cohort(tmp_path / "moved", replace(config, registration_error_mm=(4.0, 8.0)), progress=False)
    anatomy = build_anatomy(config)
    with_lesions = 0
    for subject in plain.subjects:
        meta = moved.info["subjects"][subject]
        assert 4.0 <= meta["registration_error_mm"] <= 8.0
        ours = np.asarray(nib.load(moved.image(subject)).dataobj)
        theirs = np.asarray(nib.load(plain.image(subject)).dataobj)
        assert not np.array_equal(ours, theirs)
        # same lesions drawn (the warp has its own stream), rendered where the warp put them
        assert meta["lesions"] == plain.info["subjects"][subject]["lesions"]
        labels = np.asarray(nib.load(moved.label(subject)).dataobj) > 0
        before = np.asarray(nib.load(plain.label(subject)).dataobj) > 0
        if before.any():
            with_lesions += 1
            assert labels.any() and not np.array_equal(labels, before)
            affine = np.asarray(meta["affine"])[:3, :3]  # native voxels (same grid in both cohorts) -> mm
            shift_mm = np.linalg.norm(affine @ (np.argwhere(labels).mean(0) - np.argwhere(before).mean(0)))
            assert 0 < shift_mm <= meta["registration_error_mm"] + 2 * anatomy.spacing
    assert with_lesions >= 2  # the look-alike scans' lesions were checked
    with pytest.raises(VolscanError, match="registration error"):
        replace(config, registration_error_mm=(5.0, 2.0)).validate()
