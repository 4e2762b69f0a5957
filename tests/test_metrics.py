"""volumetric.metrics against hand-computable cases and straightforward reference code."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from volumetric.errors import VolscanError
from volumetric.metrics import (
    ScoreHistogram,
    aupro,
    aupro_cflow,
    auroc,
    average_precision,
    dice,
    f1_max,
    pool_to_grid,
    pro_curve,
)


def test_collection_metrics_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.8, 0.9])
    assert auroc(perfect, labels) == 1.0
    assert auroc(-perfect, labels) == 0.0
    assert average_precision(perfect, labels) == 1.0
    assert f1_max(perfect, labels).f1 == 1.0
    assert f1_max(perfect, labels).threshold == pytest.approx(0.8)
    # Pairs (pos, neg): 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4.
    mixed = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(mixed, labels) == pytest.approx(0.75)
    # Threshold 0.35 -> TP 2, FP 1: F1 = 2*(2/3)*1/(2/3+1) = 0.8; threshold 0.8 -> F1 = 2/3.
    best = f1_max(mixed, labels)
    assert best.f1 == pytest.approx(0.8)
    assert best.threshold == pytest.approx(0.35)
    # AP: recall 0.5 at precision 1, recall 1 at precision 2/3.
    assert average_precision(mixed, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_collection_metrics_refuse_one_class_and_nan() -> None:
    with pytest.raises(VolscanError, match="both classes"):
        auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(VolscanError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(VolscanError, match="labels"):
        f1_max(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))


def test_histogram_matches_sklearn_on_quantised_scores() -> None:
    rng = np.random.default_rng(0)
    bins = 64
    # Scores at bin centres: the histogram is exact, ties included.
    codes = rng.integers(0, bins, size=5000)
    scores = (codes + 0.5) / bins
    labels = rng.random(5000) < 0.2 + 0.6 * scores
    hist = ScoreHistogram(0.0, 1.0, bins=bins)
    for chunk in np.array_split(np.arange(scores.size), 7):
        hist.add(scores[chunk], labels[chunk])
    assert hist.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert hist.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert hist.f1_max().f1 == pytest.approx(f1_max(scores, labels).f1, abs=1e-12)
    assert hist.f1_max().threshold == pytest.approx(f1_max(scores, labels).threshold - 0.5 / bins)


def test_histogram_auroc_within_its_error_bound() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(20000) < 0.1
    scores = rng.normal(size=labels.size) + 1.5 * labels
    exact = roc_auc_score(labels, scores)
    for bins in (16, 256, 65536):
        hist = ScoreHistogram(scores.min(), scores.max(), bins=bins)
        hist.add(scores, labels)
        assert abs(hist.auroc() - exact) <= hist.auroc_error_bound() + 1e-12
    assert hist.auroc_error_bound() < 1e-3
    assert abs(hist.auroc() - exact) < 1e-4


def test_histogram_refuses_out_of_range_and_single_class() -> None:
    hist = ScoreHistogram(0.0, 1.0, bins=8)
    with pytest.raises(VolscanError, match="range"):
        hist.add(np.array([1.5]), np.array([1]))
    hist.add(np.array([0.5]), np.array([1]))
    with pytest.raises(VolscanError, match="both classes"):
        hist.auroc()


def test_dice_paper_convention() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    lesion = empty.copy()
    lesion[1:3, 1:3, 1:3] = True  # 8 voxels
    assert dice(empty, empty) == 1.0
    assert dice(empty, lesion) == 0.0
    assert dice(lesion, empty) == 0.0
    assert dice(lesion, lesion) == 1.0
    half = empty.copy()
    half[1:3, 1:3, 1] = True  # 4 voxels, all inside the lesion
    assert dice(half, lesion) == pytest.approx(2 * 4 / (4 + 8))


def test_pool_to_grid_matches_loop() -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((28, 28, 28)) < 0.0005
    pooled = pool_to_grid(mask, (2, 2, 2))
    expected = np.zeros((2, 2, 2), dtype=bool)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                expected[i, j, k] = mask[14 * i : 14 * i + 14, 14 * j : 14 * j + 14, 14 * k : 14 * k + 14].any()
    np.testing.assert_array_equal(pooled, expected)
    with pytest.raises(VolscanError, match="multiple"):
        pool_to_grid(mask, (3, 3, 3))


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Threshold by threshold, region by region, as the MVTec AD paper describes it."""
    regions = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    points = [(0.0, 0.0)]
    for t in np.sort(np.unique(maps))[::-1]:
        predicted = maps >= t
        overlaps = []
        for pred, lab in zip(predicted, regions):
            for r in range(1, lab.max() + 1):
                overlaps.append(pred[lab == r].mean())
        fpr = predicted[~masks].mean()
        points.append((fpr, float(np.mean(overlaps))))
    fprs, pros = map(np.array, zip(*points))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(zip(fprs[:-1], pros[:-1]), zip(fprs[1:], pros[1:])):
        if f0 >= max_fpr:
            break
        if f1 > max_fpr:
            p1 = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
            f1 = max_fpr
        area += (f1 - f0) * (p0 + p1) / 2
    return area / max_fpr


def test_aupro_matches_reference_and_perfect_map() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 8:10, 7:11] = True  # two regions of different size in one image
    masks[1, 5:7, 5:6] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    maps = np.round(maps, 2)  # create ties
    for max_fpr in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, max_fpr) == pytest.approx(_reference_aupro(maps, masks, max_fpr), abs=1e-9)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    with pytest.raises(VolscanError, match="region"):
        aupro(maps, np.zeros_like(masks))


# ---------------------------------------------------------------- the field's reference values
# Numbers from anomalib's metric tests (tests/unit/metrics: test_aupro, test_pro,
# test_adaptive_threshold) and MONAI's ROC-AUC test, re-computed with volscan's own code.


def _anomalib_aupro_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 400 x 7 prediction ramp 0 .. 2799/2800 (row-major) and two label images: column 3 (one
    region), columns 1, 3, 5 (three regions)."""
    predictions = (np.arange(2800) / 2800.0).reshape(1, 400, 7)
    one = np.zeros((1, 400, 7), dtype=bool)
    one[..., 3] = True
    three = np.zeros((1, 400, 7), dtype=bool)
    three[..., [1, 3, 5]] = True
    return predictions, one, three


def test_aupro_anomalib_reference_value() -> None:
    """fpr_limit 1/3 -> AUPRO 1/6 (PRO = FPR on a ramp) for one region, three regions, and both
    images together (per-region overlaps averaged); binned (200 thresholds) and exact agree to 1e-3
    without being equal."""
    predictions, one, three = _anomalib_aupro_case()
    cases = [(predictions, one), (predictions, three),
             (np.concatenate([predictions, predictions]), np.concatenate([one, three]))]
    for maps, masks in cases:
        exact = aupro(maps, masks, max_fpr=1 / 3)
        binned = aupro(maps, masks, max_fpr=1 / 3, thresholds=200)
        assert exact == pytest.approx(1 / 6, abs=1e-3)
        assert binned == pytest.approx(exact, abs=1e-3) and binned != exact
        # Predictions above 1 (anomalib's second check): nothing depends on the score scale.
        assert aupro(2 * maps, masks, 1 / 3, thresholds=200) == pytest.approx(aupro(2 * maps, masks, 1 / 3), abs=1e-3)


def test_pro_curve_anomalib_reference_values() -> None:
    """Five one-row regions of 1..5 pixels on rows 1, 3, ..., 9 whose predictions are
    row / 10 + 0.05: at thresholds 0, .2, ..., 1 the (macro) mean overlap is 1, .8, ..., 0."""
    labels = np.zeros((1, 10, 5), dtype=bool)
    for length, row in enumerate((1, 3, 5, 7, 9), start=1):
        labels[0, row, :length] = True
    predictions = np.repeat((np.arange(10) / 10 + 0.05)[:, None], 5, axis=1)[None]
    thresholds = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    fpr, pro = pro_curve(predictions, labels, thresholds)
    np.testing.assert_allclose(pro, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0], atol=1e-12)
    # Normal pixels: 35 in rows 0, 2, ..., 8 (scores .05 .. .85) plus 10 beside the short regions.
    normal = predictions[~labels]
    np.testing.assert_allclose(fpr, [(normal >= t).mean() for t in thresholds], atol=1e-12)


def test_f1_threshold_anomalib_reference_values_and_only_normal_images() -> None:
    """anomalib's adaptive (F1-optimal) threshold cases: 3.3 on the standard case, 4 when recall
    is 1 at the highest threshold. With only normal images there is no F1 to optimise: volscan
    refuses (the report shows null with a note) instead of collapsing to the lowest score."""
    standard = f1_max(np.array([2.3, 1.6, 2.6, 7.9, 3.3]), np.array([0, 0, 0, 1, 1]))
    assert standard.threshold == pytest.approx(3.3) and standard.f1 == pytest.approx(1.0)
    assert f1_max(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 0, 0])).threshold == pytest.approx(4.0)
    only_normal = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(VolscanError, match="both classes"):
        f1_max(only_normal, np.zeros(5))
    hist = ScoreHistogram(0.0, 1.0, bins=16)
    hist.add(only_normal, np.zeros(5))
    with pytest.raises(VolscanError, match="both classes"):
        hist.f1_max()


def test_auroc_monai_reference_value() -> None:
    """MONAI's compute_roc_auc case: [.5, .5, .2, 8.3] against [0, 1, 0, 1] -> 0.875."""
    assert auroc(np.array([0.5, 0.5, 0.2, 8.3]), np.array([0, 1, 0, 1])) == pytest.approx(0.875, abs=1e-12)
    hist = ScoreHistogram(0.2, 8.3, bins=1024)  # the tie 0.5 / 0.5 falls in one bin: half a pair, as exact
    hist.add(np.array([0.5, 0.5, 0.2, 8.3]), np.array([0, 1, 0, 1]))
    assert hist.auroc() == pytest.approx(0.875, abs=1e-12)


def _reference_aupro_cflow(masks: np.ndarray, maps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """MuSc's `cal_pro_score` (cflow-ad's definition) written out: thresholds by np.arange, region
    by region with skimage.measure.regionprops, FPR < expect_fpr kept and min-max re-normalised."""
    from skimage import measure
    from sklearn.metrics import auc

    low, high = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / max_step):
        binary = maps > th
        overlaps = []
        for image, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask)):
                overlaps.append(image[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
        pros.append(np.mean(overlaps))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    kept = fprs[keep]
    return float(auc((kept - kept.min()) / (kept.max() - kept.min()), pros[keep]))


def test_aupro_cflow_matches_muscs_formulation_and_differs_from_mvtec() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 20, 20), dtype=bool)
    masks[0, 3:8, 4:9] = True
    masks[0, 14:16, 10:18] = True
    masks[2, 9:13, 9:12] = True
    maps = rng.random(masks.shape) + 0.7 * masks
    assert aupro_cflow(maps, masks) == pytest.approx(_reference_aupro_cflow(masks, maps), abs=1e-9)
    # On anomalib's ramp (PRO = FPR) cflow's form averages PRO over FPR in [0, 0.3): ~0.15, not 1/6.
    predictions, one, _ = _anomalib_aupro_case()
    assert aupro_cflow(predictions, one) == pytest.approx(_reference_aupro_cflow(one, predictions), abs=1e-9)
    assert aupro_cflow(predictions, one) == pytest.approx(0.15, abs=2e-3)
    assert aupro(predictions, one) == pytest.approx(0.15, abs=2e-3)  # MVTec's to 0.3: 0.3^2 / 2 / 0.3
    # Maps on a 0.25 grid over [0, 3] with 12 steps: every threshold is a map level, and normal
    # pixels hold the top level, so counting ties at `t` as positive (`>= t`) would move the
    # curve's last point (MuSc: only pixels strictly above `t` are positive).
    levels = np.minimum(0.25 * rng.integers(0, 13, size=masks.shape) + 1.0 * masks, 3.0)
    assert aupro_cflow(levels, masks, steps=12) == pytest.approx(_reference_aupro_cflow(masks, levels, 12), abs=1e-9)
    with pytest.raises(VolscanError, match="constant"):
        aupro_cflow(np.zeros(masks.shape), masks)
