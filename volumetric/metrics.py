"""Evaluation metrics of the paper's protocol, 2D and 3D.

Collection level (patients / images): AUROC, average precision and F1-max from scikit-learn.
Element level:

- `ScoreHistogram` accumulates per-class counts of voxel / pixel scores in fixed bins, so a
  cohort of N x 224^3 voxels (~1.6e9 for N = 150) is scored in constant memory. AUROC, AP and
  F1-max are then computed from the counts. Scores in one bin count as ties (half a correct
  pair for AUROC), so the AUROC differs from the exact value by at most
  `0.5 * sum_b pos_b * neg_b / (P * N)`, which `auroc_error_bound` reports; with the default
  2^16 bins over the observed score range this is ~1e-5 on real maps (documented in
  docs/screen.md). Thresholds for AP / F1-max are the bin edges.
- `dice` per scan with MONAI (`compute_dice`, `ignore_empty=False`: an empty mask and an empty
  prediction give 1, the paper's convention for clean scans).
- `pool_to_grid` max-pools a full-resolution mask to the token grid (a token is abnormal if
  any of its voxels is), used for the paper's grid-level F1-max threshold.
- `aupro`: the MVTec AD per-region-overlap curve integrated up to FPR 0.3 and normalised by
  0.3 (anomalib's definition; exact, or binned over T thresholds); regions are 8-connected
  (2D) / 26-connected (3D) components from `skimage.measure.label`. `aupro_cflow`: the form MuSc
  reports (cflow-ad's: 200 thresholds, FPR < 0.3 kept and re-normalised to [0, 1]).
  `pro_curve`: (FPR, PRO) at given thresholds. Checked against anomalib's and MONAI's
  reference values in tests/test_metrics.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice
from skimage.measure import label as label_regions
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from volumetric.errors import VolscanError

__all__ = [
    "F1Max",
    "ScoreHistogram",
    "auroc",
    "average_precision",
    "f1_max",
    "dice",
    "pool_to_grid",
    "aupro",
    "aupro_cflow",
    "pro_curve",
]


@dataclass(frozen=True)
class F1Max:
    """Best F1 over thresholds; `threshold`: predictions `score >= threshold` are positive."""

    f1: float
    threshold: float


def _flat_pair(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scores as flat float64 and labels as flat bool, of one size."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise VolscanError(f"{scores.size} scores but {labels.size} labels")
    return scores, labels


def _binary_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = _flat_pair(scores, labels)
    if not np.isfinite(scores).all():
        raise VolscanError("scores contain NaN or infinity; replace void elements by 0 first")
    if labels.all() or not labels.any():
        raise VolscanError("metrics need both classes (normal and anomalous) among the labels")
    return scores, labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (any shape) against binary `labels` (same size)."""
    scores, labels = _binary_inputs(scores, labels)
    return float(roc_auc_score(labels, scores))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, sklearn's step definition)."""
    scores, labels = _binary_inputs(scores, labels)
    return float(average_precision_score(labels, scores))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> F1Max:
    """Highest F1 over all thresholds and the threshold reaching it."""
    scores, labels = _binary_inputs(scores, labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last PR point (recall 0, precision 1) has no threshold.
    f1 = _f1(precision[:-1], recall[:-1])
    best = int(np.argmax(f1))
    return F1Max(float(f1[best]), float(thresholds[best]))


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denominator = precision + recall
    return np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)


class ScoreHistogram:
    """Streaming per-class histogram of element scores over a fixed range `[low, high]`.

    Feed it map by map with `add(scores, labels)`; memory is `2 * bins` counters. The range
    must cover every score added (scores outside raise): take it from the token-grid scores,
    whose upsampled (trilinear, convex) maps cannot leave `[min(0, grid min), grid max]`.
    """

    def __init__(self, low: float, high: float, bins: int = 65536) -> None:
        if not (np.isfinite(low) and np.isfinite(high)) or high < low:
            raise VolscanError(f"invalid score range [{low}, {high}]")
        if bins < 2:
            raise VolscanError(f"a score histogram needs at least 2 bins, got {bins}")
        self.low = float(low)
        # A degenerate range (all scores equal) still needs a positive bin width.
        self.high = float(high) if high > low else self.low + 1.0
        self.bins = int(bins)
        self.counts = np.zeros((2, self.bins), dtype=np.int64)  # [negative, positive]

    def add(self, scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> None:
        """Count `scores` (any shape) with their binary `labels` (same shape)."""
        scores, labels = _flat_pair(scores, labels)
        tolerance = 1e-6 * (self.high - self.low)
        if scores.size and (scores.min() < self.low - tolerance or scores.max() > self.high + tolerance):
            raise VolscanError(
                f"scores in [{scores.min():.6g}, {scores.max():.6g}] leave the histogram range "
                f"[{self.low:.6g}, {self.high:.6g}]"
            )
        index = np.clip(((scores - self.low) / (self.high - self.low) * self.bins).astype(np.int64), 0, self.bins - 1)
        for cls in (0, 1):
            self.counts[cls] += np.bincount(index[labels == bool(cls)], minlength=self.bins)

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        negatives, positives = self.counts
        n_neg, n_pos = int(negatives.sum()), int(positives.sum())
        if n_neg == 0 or n_pos == 0:
            raise VolscanError("metrics need both classes (normal and anomalous) among the elements")
        # Counts at or above each bin's lower edge, highest bin first (descending thresholds).
        tp = np.cumsum(positives[::-1])
        fp = np.cumsum(negatives[::-1])
        return tp, fp, n_pos, n_neg

    def auroc(self) -> float:
        """AUROC with scores in one bin counted as ties (see `auroc_error_bound`)."""
        negatives, positives = self.counts
        tp, fp, n_pos, n_neg = self._cumulative()
        # Pairs (pos, neg) with pos in a higher bin, plus half of the same-bin pairs.
        negatives_below = np.concatenate([[0], np.cumsum(negatives)[:-1]])
        wins = np.sum(positives * negatives_below) + 0.5 * np.sum(positives * negatives)
        return float(wins / (n_pos * n_neg))

    def auroc_error_bound(self) -> float:
        """Largest possible |histogram AUROC - exact AUROC| given the counts."""
        negatives, positives = self.counts
        return float(0.5 * np.sum(positives * negatives) / (positives.sum() * negatives.sum()))

    def average_precision(self) -> float:
        """AP with the bin edges as thresholds (sklearn's step-wise definition)."""
        tp, fp, n_pos, _ = self._cumulative()
        keep = (tp + fp) > 0
        tp, fp = tp[keep], fp[keep]
        precision = tp / (tp + fp)
        recall_steps = np.diff(np.concatenate([[0], tp])) / n_pos
        return float(np.sum(recall_steps * precision))

    def f1_max(self) -> F1Max:
        """Best F1 over the bin edges; threshold = lower edge of the lowest positive bin."""
        tp, fp, n_pos, _ = self._cumulative()
        precision = np.divide(tp, tp + fp, out=np.zeros(tp.shape), where=(tp + fp) > 0)
        f1 = _f1(precision, tp / n_pos)
        best = int(np.argmax(f1))
        edge = self.bins - 1 - best
        return F1Max(float(f1[best]), self.low + edge * (self.high - self.low) / self.bins)


def dice(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks of one shape; 1.0 when both are empty (clean scan, no alarm)."""
    prediction = torch.as_tensor(np.asarray(prediction, dtype=bool))
    target = torch.as_tensor(np.asarray(target, dtype=bool))
    if prediction.shape != target.shape:
        raise VolscanError(f"prediction shape {tuple(prediction.shape)} != mask shape {tuple(target.shape)}")
    value = compute_dice(prediction[None, None].float(), target[None, None].float(), ignore_empty=False)
    return float(value.item())


def pool_to_grid(mask: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """Max-pool a full-resolution binary mask (S,S,S) or (H,W) to the token grid `grid`.

    Each grid cell covers `S / g` voxels per axis (14 for ViT/14 tokens); a cell is positive if
    any voxel in it is.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != len(grid) or any(s % g for s, g in zip(mask.shape, grid)):
        raise VolscanError(f"mask shape {mask.shape} is not a whole multiple of token grid {tuple(grid)}")
    shape: list[int] = []
    for size, cells in zip(mask.shape, grid):
        shape += [cells, size // cells]
    return mask.reshape(shape).any(axis=tuple(range(1, 2 * len(grid), 2)))


def _region_steps(anomaly_maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat float64 scores and, per pixel, what it adds to PRO and to FPR once above threshold.

    Regions are the connected components of each mask (8-connected in 2D, 26 in 3D); an
    anomalous pixel adds `1 / (|region| * n_regions)` to PRO, a normal one `1 / n_normal` to FPR.
    """
    maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise VolscanError(f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape")
    if not np.isfinite(maps).all():
        raise VolscanError("anomaly maps contain NaN or infinity; replace void elements by 0 first")
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled = label_regions(mask, connectivity=mask.ndim)
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += int(labelled.max())
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise VolscanError("AUPRO needs at least one anomalous region and one normal pixel")
    flat_regions = regions.ravel()
    region_sizes = np.bincount(flat_regions)
    pro_step = np.where(flat_regions > 0, 1.0 / (region_sizes[flat_regions] * n_regions), 0.0)
    fpr_step = np.where(flat_regions > 0, 0.0, 1.0 / n_normal)
    return maps.ravel(), pro_step, fpr_step


def pro_curve(
    anomaly_maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, *, strict: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at each of `thresholds` (T,): pixels `>= t` are positive (`> t` when `strict`).

    PRO is the mean over all ground-truth regions of the share of the region that is positive;
    FPR the share of normal pixels that are. `anomaly_maps`, `masks`: (N, H, W) or (N, D, H, W)."""
    scores, pro_step, fpr_step = _region_steps(anomaly_maps, masks)
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    order = np.argsort(thresholds, kind="stable")
    # Number of (sorted) thresholds each pixel reaches; it is positive at the j-th when j < reached.
    reached = np.searchsorted(thresholds[order], scores, side="left" if strict else "right")
    fpr, pro = (np.cumsum(np.bincount(reached, weights=step, minlength=thresholds.size + 1)[::-1])[::-1][1:]
                for step in (fpr_step, pro_step))
    out_fpr, out_pro = np.empty_like(fpr), np.empty_like(pro)
    out_fpr[order], out_pro[order] = fpr, pro
    return out_fpr, out_pro


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under (0, 0) + the points (ascending FPR) up to `max_fpr`, divided by it;
    the segment that crosses `max_fpr` is interpolated."""
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    above = int(np.searchsorted(fpr, max_fpr, side="right"))
    if above == fpr.size:
        pro_cut = pro[-1]
    else:
        below = above - 1
        slope = (pro[above] - pro[below]) / (fpr[above] - fpr[below])
        pro_cut = pro[below] + slope * (max_fpr - fpr[below])
    fpr_curve = np.concatenate([fpr[:above], [max_fpr]])
    pro_curve_ = np.concatenate([pro[:above], [pro_cut]])
    return float(np.trapezoid(pro_curve_, fpr_curve) / max_fpr)


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to `max_fpr` (MVTec AD protocol,
    anomalib's `AUPRO`): the curve (FPR, PRO) is integrated (trapezoid, from (0, 0), the segment
    crossing `max_fpr` interpolated) over `[0, max_fpr]` and divided by `max_fpr`, so a perfect map
    scores 1. `thresholds`: None = every distinct score (exact); an int T = T evenly spaced
    thresholds over the maps' range (anomalib's binned form, within ~1e-3 of the exact value).

    `anomaly_maps`, `masks`: (N, H, W) (or (N, D, H, W)).
    """
    if not 0 < max_fpr <= 1:
        raise VolscanError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if thresholds is not None:
        if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 2:
            raise VolscanError(f"thresholds must be None or an integer >= 2, got {thresholds!r}")
        values = np.asarray(anomaly_maps, dtype=np.float64)
        grid = np.linspace(values.min(), values.max(), thresholds)[::-1]  # descending: ascending FPR
        fpr, pro = pro_curve(anomaly_maps, masks, grid)
        return _normalised_area(fpr, pro, max_fpr)
    scores, pro_step, fpr_step = _region_steps(anomaly_maps, masks)
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    pro = np.cumsum(pro_step[order])
    fpr = np.cumsum(fpr_step[order])
    # Only the last index of each run of equal scores is a reachable operating point.
    last_of_tie = np.concatenate([scores[1:] != scores[:-1], [True]])
    return _normalised_area(fpr[last_of_tie], pro[last_of_tie], max_fpr)


def aupro_cflow(anomaly_maps: np.ndarray, masks: np.ndarray, steps: int = 200, max_fpr: float = 0.3) -> float:
    """AUPRO as MuSc reports it (cflow-ad's definition): PRO and FPR at `steps` thresholds
    `min + i (max - min) / steps` (pixels `> t` positive), the points with FPR < `max_fpr` kept,
    their FPRs min-max re-normalised to [0, 1] and the trapezoid area taken. It differs from
    `aupro` for the same maps (the curve is not anchored at (0, 0), and PRO is averaged over the
    kept FPR span rather than over [0, max_fpr]): compare each with numbers of its own kind."""
    values = np.asarray(anomaly_maps, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise VolscanError("AUPRO (cflow) needs maps that are not constant")
    grid = np.arange(low, high, (high - low) / steps)
    fpr, pro = pro_curve(anomaly_maps, masks, grid, strict=True)
    keep = fpr < max_fpr
    if int(keep.sum()) < 2 or not fpr[keep].max() > fpr[keep].min():
        raise VolscanError(f"AUPRO (cflow) needs at least two thresholds with distinct FPR below {max_fpr}")
    span = fpr[keep]
    span = (span - span.min()) / (span.max() - span.min())
    # In threshold order (FPR falling), as MuSc integrates: where several thresholds share FPR 0,
    # the segment to the first non-zero FPR starts at the highest of their PROs.
    return float(-np.trapezoid(pro[keep], span))
