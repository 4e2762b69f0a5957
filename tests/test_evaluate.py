"""pipelines.evaluate: the paper's 3D protocol and the 2D metrics on hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluate import RunElements, image_metrics, pack_mask, volume_metrics
from pipelines.maps import score_range, upsample_scores

SIZE = 28  # token grid 2^3, 14 voxels per token


def _cases(scores_of_lesion_token: float, lesion_ids: tuple[int, ...], n: int = 4) -> tuple[RunElements, dict]:
    """Subject i has token (0,0,0) scored `scores_of_lesion_token` if lesion, else 0 everywhere;
    lesion masks fill exactly that token's 14^3 block."""
    scores = np.zeros((n, 2, 2, 2), dtype=np.float32)
    scores[:, 1, 1, 1] = np.nan  # one void token everywhere
    cubes = {}
    for i in range(n):
        cube = np.zeros((SIZE,) * 3, dtype=bool)
        if i in lesion_ids:
            scores[i, 0, 0, 0] = scores_of_lesion_token
            cube[:14, :14, :14] = True
        cubes[i] = cube
    collection = np.nanmax(scores.reshape(n, -1), axis=1)
    brain = np.stack([pack_mask(np.ones((SIZE,) * 3, dtype=bool))] * n)
    elements = RunElements([f"s{i}" for i in range(n)], scores, collection, SIZE, "3d", brain)
    return elements, cubes


def test_perfect_scores_give_hand_computed_dice() -> None:
    elements, cubes = _cases(1.0, (0, 2))
    summary, per_subject = volume_metrics(elements, lambda i: (bool(cubes[i].any()), cubes[i]), bins=1024)
    assert summary["patient_auroc"] == 1.0 and summary["patient_f1_max"] == 1.0 and summary["patient_ap"] == 1.0
    assert summary["grid_f1_max"] == 1.0 and summary["dice_threshold"] == 1.0
    # Upsampled (align_corners=False) map equals 1 only where the interpolation clamps at the
    # grid border: voxels 0..6 of the lesion block per axis -> 7^3 of the 14^3 lesion voxels.
    lesion_dice = 2 * 7**3 / (7**3 + 14**3)
    assert [s["dice"] for s in per_subject] == pytest.approx([lesion_dice, 1.0, lesion_dice, 1.0])
    assert summary["dice_mean_lesion"] == pytest.approx(lesion_dice)
    assert summary["dice_mean_all"] == pytest.approx((2 * lesion_dice + 2) / 4)
    assert summary["voxel_auroc"] > 0.9
    assert summary["n_lesion_scans"] == 2 and summary["notes"] == []


def test_inverted_scores() -> None:
    elements, cubes = _cases(1.0, (0, 2))
    elements.collection_scores = -elements.collection_scores
    summary, _ = volume_metrics(elements, lambda i: (bool(cubes[i].any()), cubes[i]), bins=1024)
    assert summary["patient_auroc"] == 0.0


def test_all_healthy_reports_nulls_with_notes() -> None:
    elements, cubes = _cases(1.0, ())
    summary, per_subject = volume_metrics(elements, lambda i: (False, cubes[i]), bins=64)
    assert summary["patient_auroc"] is None and summary["voxel_auroc"] is None
    assert summary["dice_mean_all"] is None and summary["dice_mean_lesion"] is None
    assert any("both classes" in note for note in summary["notes"])
    assert [s["label"] for s in per_subject] == [0, 0, 0, 0]


def test_voxel_auroc_matches_sklearn_on_the_upsampled_maps() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    elements, cubes = _cases(1.0, (1, 3))
    elements.element_scores = rng.random(elements.element_scores.shape).astype(np.float32)
    elements.collection_scores = elements.element_scores.reshape(4, -1).max(1)
    summary, _ = volume_metrics(elements, lambda i: (bool(cubes[i].any()), cubes[i]), bins=65536)
    maps = np.stack([upsample_scores(s, SIZE) for s in elements.element_scores])
    exact = roc_auc_score(np.stack(list(cubes.values())).ravel(), maps.ravel())
    assert abs(summary["voxel_auroc"] - exact) <= summary["voxel_auroc_error_bound"] + 1e-9
    assert summary["voxel_auroc"] == pytest.approx(exact, abs=1e-4)


def test_image_metrics_perfect_and_empty_masks() -> None:
    n, size = 4, 28
    scores = np.zeros((n, 2, 2), dtype=np.float32)
    masks = [np.zeros((size, size), dtype=bool) for _ in range(n)]
    for i in (1, 2):
        scores[i, 1, 0] = 2.0
        masks[i][14:, :14] = True
    elements = RunElements([f"i{i}" for i in range(n)], scores, scores.reshape(n, -1).max(1), size, "2d")
    summary, per_subject = image_metrics(elements, masks, bins=4096)
    assert summary["image_auroc"] == 1.0 and summary["image_f1_max"] == 1.0
    assert summary["pixel_auroc"] > 0.95 and 0 < summary["aupro"] <= 1
    assert [s["label"] for s in per_subject] == [0, 1, 1, 0]


def test_score_range_bounds_upsampled_maps() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 3, 3, 3)).astype(np.float32)
    scores[0, 0, 0, 0] = np.nan
    low, high = score_range(scores)
    for grid in scores:
        upsampled = upsample_scores(grid, 42)
        assert low <= upsampled.min() and upsampled.max() <= high
