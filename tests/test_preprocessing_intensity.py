"""Nyúl standardisation: scale invariance, a reference implementation, landmark files."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.intensity import Landmarks, landmark_percentiles, learn_landmarks, standardize
from volumetric.errors import InputFileError, VolscanError

RNG = np.random.default_rng(3)


def _phantom():
    """Ellipsoid 'brain' with two tissue classes and noise, in a zero background; (image, mask)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.9, 0.7])[:, None, None, None]) ** 2).sum(0))
    mask = radius < 1
    image = np.where(radius < 0.5, 300.0, 180.0) + RNG.normal(0, 15, mask.shape)
    return np.where(mask, image, 0).astype(np.float32), mask


def test_scaled_copies_come_out_with_matching_histograms():
    image, mask = _phantom()
    low, high = image * 0.1, image * 10
    landmarks = learn_landmarks([(low, mask), (high, mask)])
    a, b = standardize(low, mask, landmarks), standardize(high, mask, landmarks)
    np.testing.assert_allclose(a, b, atol=1e-3)
    bins = np.linspace(-10, 110, 61)
    np.testing.assert_array_equal(np.histogram(a[mask], bins)[0], np.histogram(b[mask], bins)[0])
    assert np.all(a[~mask] == 0)


def test_matches_a_reference_piecewise_linear_map():
    image, mask = _phantom()
    cohort = [(image * s + o, mask) for s, o in ((1.0, 0.0), (2.5, 40.0), (0.7, -10.0))]
    landmarks = learn_landmarks(cohort)
    # Reference: Nyúl's average mapping of each volume's percentiles onto [0, 100].
    percentiles = landmark_percentiles((0.01, 0.99))
    rows = np.array([np.percentile(v[m], percentiles) for v, m in cohort])
    scaled = (rows - rows[:, :1]) / (rows[:, -1:] - rows[:, :1]) * 100
    np.testing.assert_allclose(landmarks.values, scaled.mean(0), atol=1e-6)
    target = image * 1.7 + 5
    out = standardize(target, mask, landmarks)
    own = np.percentile(target[mask], percentiles)
    inside = mask & (target >= own[0]) & (target <= own[-1])
    expected = np.interp(target[inside], own, landmarks.values)
    # torchio skips the 25th/75th percentiles when applying; both maps agree closely anyway.
    assert np.abs(out[inside] - expected).max() < 2.0
    assert np.corrcoef(out[inside], expected)[0, 1] > 0.999


def test_landmark_files_round_trip_with_their_cutoff(tmp_path):
    image, mask = _phantom()
    custom = learn_landmarks([(image, mask)], cutoff=(0.05, 0.95))
    path = custom.save(tmp_path / "lm.npy")
    loaded = Landmarks.load(path)
    assert loaded.cutoff == (0.05, 0.95) and loaded.digest == custom.digest
    np.testing.assert_array_equal(np.load(path), custom.values)  # plain torchio-style array
    default = learn_landmarks([(image, mask)])
    assert not np.allclose(standardize(image, mask, loaded), standardize(image, mask, default))
    (tmp_path / "bare.npy").write_bytes((tmp_path / "lm.npy").read_bytes())
    assert Landmarks.load(tmp_path / "bare.npy").cutoff == (0.01, 0.99)


def test_bad_landmarks_and_settings(tmp_path):
    image, mask = _phantom()
    np.save(tmp_path / "short.npy", np.arange(5.0))
    with pytest.raises(InputFileError, match="expected 13 increasing"):
        Landmarks.load(tmp_path / "short.npy")
    (tmp_path / "junk.npy").write_text("junk", encoding="utf-8")
    with pytest.raises(InputFileError, match="^.*junk.npy: not a landmarks"):
        Landmarks.load(tmp_path / "junk.npy")
    with pytest.raises(VolscanError, match=".npy"):
        learn_landmarks([(image, mask)]).save(tmp_path / "lm.pth")
    with pytest.raises(VolscanError, match="cutoff"):
        learn_landmarks([(image, mask)], cutoff=(0.2, 0.8))
    with pytest.raises(VolscanError, match="empty brain mask"):
        standardize(image, np.zeros_like(mask), learn_landmarks([(image, mask)]))
