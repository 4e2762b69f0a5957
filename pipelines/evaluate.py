"""Metrics of a screen run against masks, for `volscan screen --labels` and `volscan evaluate`.

3D (the paper's protocol, all in the preprocessed cube, i.e. template space at `size`^3):
- patient level: label = the native mask has a positive voxel (absent/empty mask = healthy);
  score = the engine's collection score (max over valid tokens); AUROC, AP, F1-max.
- masks go into the cube with `NativeMapping.to_cube(order=0)` (nearest neighbour);
- ground truth max-pooled to the token grid; the F1-max threshold over every token of every
  scan (void tokens score 0) binarises the upsampled map; per-scan Dice (MONAI) at cube
  resolution; a scan without lesion and without positive voxel has Dice 1; means over all
  scans and over lesion scans.
- voxel AUROC at cube resolution, streamed through a histogram (`ScoreHistogram`, error bound
  reported) over every cube voxel (`voxel_auroc`) and over the brain mask only
  (`voxel_auroc_brain`; background voxels are trivially normal and inflate the first).
2D: image AUROC/AP/F1-max; pixel AUROC/AP/F1-max, AUPRO (MVTec / anomalib) and AUPRO as MuSc
reports it (`aupro_cflow`) at the model resolution
(`size`^2: masks resized with nearest neighbour, maps upsampled from the token grid).

The run folder keeps what this needs (`elements.npz`: token-grid scores, collection scores,
packed cube brain masks; `mappings/<id>.json` for 3D), so `volscan evaluate` never re-runs the
model. Metrics needing both classes are reported as null with a note when one class is absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipelines.figures import histogram_figure, roc_figure
from pipelines.images2d import resize
from pipelines.subjects import check_label_grid, match_labels
from pipelines.labels import read_mask
from pipelines.maps import score_range, upsample_scores
from pipelines.report import Report, read_report_json
from pipelines.report_build import write_run_tables
from pipelines.run_layout import FIGURES_DIR, RunLayout
from preprocessing.native_mapping import NativeMapping
from volumetric.errors import InputFileError, VolscanError
from volumetric.metrics import ScoreHistogram, aupro, aupro_cflow, auroc, average_precision, dice, f1_max, pool_to_grid

log = logging.getLogger(__name__)

@dataclass
class RunElements:
    """What metrics need from a run: `ids` (N,), `element_scores` (N, *grid) float32 (NaN =
    void), `collection_scores` (N,), `size` (cube / square edge), `kind` ("3d"/"2d"),
    `brain_masks` (N, S^3/8) uint8 packed bits or None."""

    ids: list[str]
    element_scores: np.ndarray
    collection_scores: np.ndarray
    size: int
    kind: str
    brain_masks: np.ndarray | None = None

    def brain_mask(self, index: int) -> np.ndarray | None:
        """(S,)*3 bool brain mask of subject `index`, or None."""
        return None if self.brain_masks is None else unpack_mask(self.brain_masks[index], (self.size,) * 3)

    def save(self, path: Path) -> None:
        """Compressed npz (written inside the run's temporary folder)."""
        arrays: dict[str, Any] = dict(
            ids=np.asarray(self.ids),
            element_scores=self.element_scores.astype(np.float32),
            collection_scores=np.asarray(self.collection_scores, dtype=np.float64),
            size=np.int64(self.size),
            kind=np.asarray(self.kind),
        )
        if self.brain_masks is not None:
            arrays["brain_masks"] = self.brain_masks
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> "RunElements":
        """Read `elements.npz` of a run folder."""
        if not path.is_file():
            raise InputFileError(path, "not found; is this a volscan screen output folder?")
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    ids=[str(i) for i in data["ids"]],
                    element_scores=data["element_scores"],
                    collection_scores=data["collection_scores"],
                    size=int(data["size"]),
                    kind=str(data["kind"]),
                    brain_masks=data["brain_masks"] if "brain_masks" in data.files else None,
                )
        except (OSError, KeyError, ValueError) as exc:
            raise InputFileError(path, f"not a volscan elements file ({exc})") from None


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bool array -> flat packed uint8 bits (8x smaller; for masks kept across a cohort)."""
    return np.packbits(np.asarray(mask, dtype=bool).ravel())


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_mask`: bool array of `shape`."""
    return np.unpackbits(packed, count=int(np.prod(shape))).astype(bool).reshape(shape)


def _both_classes(fn: Callable[[], Any], what: str, notes: list[str]) -> Any:
    try:
        return fn()
    except VolscanError as exc:
        notes.append(f"{what}: {exc}")
        return None


def collection_metrics(scores: np.ndarray, labels: np.ndarray, prefix: str, notes: list[str]) -> dict[str, Any]:
    """`<prefix>_auroc`, `_ap`, `_f1_max`, `_f1_threshold` (None when one class is missing)."""
    best = _both_classes(lambda: f1_max(scores, labels), f"{prefix} metrics", notes)
    if best is None:
        return {f"{prefix}_{k}": None for k in ("auroc", "ap", "f1_max", "f1_threshold")}
    return {
        f"{prefix}_auroc": auroc(scores, labels),
        f"{prefix}_ap": average_precision(scores, labels),
        f"{prefix}_f1_max": best.f1,
        f"{prefix}_f1_threshold": best.threshold,
    }


def volume_metrics(
    elements: RunElements,
    label_cubes: Callable[[int], tuple[bool, np.ndarray]],
    bins: int = 65536,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Paper-protocol 3D metrics. `label_cubes(i)` -> (native mask has lesion, (S,S,S) bool mask
    in the cube). Returns (summary metrics, per-subject dicts with `label` and `dice`)."""
    n, size = len(elements.ids), elements.size
    grid = tuple(elements.element_scores.shape[1:])
    notes: list[str] = []
    patient_labels = np.zeros(n, dtype=bool)
    packed_cubes: list[np.ndarray] = []
    grid_truth = np.zeros((n, *grid), dtype=bool)
    # Pass 1: masks into the cube and onto the grid; cube masks kept as packed bits (S^3/8 bytes).
    for i in tqdm(range(n), desc="metrics: masks", unit="scan", leave=False):
        patient_labels[i], cube = label_cubes(i)
        grid_truth[i] = pool_to_grid(cube, grid)
        packed_cubes.append(pack_mask(cube))
    summary: dict[str, Any] = {
        "n_scans": n,
        "n_lesion_scans": int(patient_labels.sum()),
        **collection_metrics(elements.collection_scores, patient_labels, "patient", notes),
    }
    grid_scores = np.nan_to_num(elements.element_scores, nan=0.0)
    threshold = _both_classes(lambda: f1_max(grid_scores, grid_truth), "token-grid F1-max", notes)
    summary["grid_f1_max"] = None if threshold is None else threshold.f1
    summary["dice_threshold"] = None if threshold is None else threshold.threshold
    low, high = score_range(elements.element_scores)
    whole, brain = ScoreHistogram(low, high, bins), ScoreHistogram(low, high, bins)
    per_subject = []
    # Pass 2: one upsampled map at a time.
    for i in tqdm(range(n), desc="metrics: voxels", unit="scan", leave=False):
        cube = unpack_mask(packed_cubes[i], (size,) * 3)
        score_map = upsample_scores(elements.element_scores[i], size)
        whole.add(score_map, cube)
        mask = elements.brain_mask(i)
        if mask is not None:
            brain.add(score_map[mask], cube[mask])
        value = None if threshold is None else dice(score_map >= threshold.threshold, cube)
        per_subject.append({"label": int(patient_labels[i]), "dice": value, "lesion_voxels_cube": int(cube.sum())})
    summary["voxel_auroc"] = _both_classes(whole.auroc, "voxel AUROC", notes)
    summary["voxel_auroc_error_bound"] = None if summary["voxel_auroc"] is None else whole.auroc_error_bound()
    summary["voxel_auroc_brain"] = (
        _both_classes(brain.auroc, "voxel AUROC (brain)", notes) if elements.brain_masks is not None else None
    )
    dices = np.array([s["dice"] for s in per_subject if s["dice"] is not None], dtype=np.float64)
    lesion_dices = np.array(
        [s["dice"] for s in per_subject if s["dice"] is not None and s["label"]], dtype=np.float64
    )
    summary["dice_mean_all"] = float(dices.mean()) if dices.size else None
    summary["dice_mean_lesion"] = float(lesion_dices.mean()) if lesion_dices.size else None
    summary["notes"] = notes
    return summary, per_subject


def image_metrics(
    elements: RunElements, masks: Sequence[np.ndarray], bins: int = 65536
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """2D metrics; `masks[i]`: (size, size) bool mask of image i at the model resolution."""
    n, size = len(elements.ids), elements.size
    notes: list[str] = []
    labels = np.array([bool(np.any(m)) for m in masks])
    maps = np.stack([upsample_scores(elements.element_scores[i], size) for i in range(n)])
    truth = np.stack([np.asarray(m, dtype=bool) for m in masks])
    summary: dict[str, Any] = {
        "n_images": n,
        "n_anomalous_images": int(labels.sum()),
        **collection_metrics(elements.collection_scores, labels, "image", notes),
    }
    histogram = ScoreHistogram(*score_range(elements.element_scores), bins)
    histogram.add(maps, truth)
    pixel_f1 = _both_classes(histogram.f1_max, "pixel metrics", notes)
    summary["pixel_auroc"] = None if pixel_f1 is None else histogram.auroc()
    summary["pixel_auroc_error_bound"] = None if pixel_f1 is None else histogram.auroc_error_bound()
    summary["pixel_ap"] = None if pixel_f1 is None else histogram.average_precision()
    summary["pixel_f1_max"] = None if pixel_f1 is None else pixel_f1.f1
    summary["aupro"] = _both_classes(lambda: aupro(maps, truth), "AUPRO", notes)
    summary["aupro_cflow"] = _both_classes(lambda: aupro_cflow(maps, truth), "AUPRO (cflow-ad / MuSc)", notes)
    summary["notes"] = notes
    return summary, [{"label": int(label)} for label in labels]


def label_cube_loader(run_dir: Path, elements: RunElements, labels: Sequence[Path | None]) -> Callable[[int], tuple[bool, np.ndarray]]:
    """`i -> (has lesion, mask at model resolution)` for the run's subjects; None = healthy.

    3D: the native mask through the subject's saved `NativeMapping.to_cube` (nearest);
    2D: the mask image resized (nearest) to `size`^2.
    """
    size = elements.size
    shape = (size,) * (3 if elements.kind == "3d" else 2)

    def load(i: int) -> tuple[bool, np.ndarray]:
        path = labels[i]
        if path is None:
            return False, np.zeros(shape, dtype=bool)
        native = read_mask(path, elements.kind)  # the label rule of `pipelines.labels`
        if elements.kind == "2d":
            return bool(native.any()), resize(native, shape, nearest=True)
        mapping = NativeMapping.load(RunLayout(run_dir).mapping(elements.ids[i]))
        if native.shape != mapping.native_shape:
            raise InputFileError(path, f"mask grid {native.shape} does not match its image grid {mapping.native_shape}")
        return bool(native.any()), mapping.to_cube(native.astype(np.float32), order=0) > 0.5

    return load


def score_figures(run_dir: Path, report: Report, scores: np.ndarray, labels: np.ndarray | None) -> None:
    """Score histogram (by class with labels) and, with both classes, the ROC curve."""
    figures_dir = run_dir / FIGURES_DIR
    figures_dir.mkdir(exist_ok=True)
    histogram_figure(scores, labels, figures_dir / "score_histogram.png")
    report.figures["score histogram"] = f"{FIGURES_DIR}/score_histogram.png"
    metrics = report.metrics or {}
    key = "patient_auroc" if report.kind == "3d" else "image_auroc"
    if labels is not None and metrics.get(key) is not None:
        roc_figure(scores, labels, metrics[key], figures_dir / "roc.png")
        report.figures["ROC curve"] = f"{FIGURES_DIR}/roc.png"


def attach_metrics(
    run_dir: Path, report: Report, elements: RunElements, labels: Sequence[Path | None], bins: int
) -> dict[str, Any]:
    """Compute metrics against `labels` (one mask path or None per subject, elements order),
    store them in `report` (summary + per-subject label/dice) and draw the score figures."""
    loader = label_cube_loader(run_dir, elements, labels)
    if elements.kind == "3d":
        summary, per_subject = volume_metrics(elements, loader, bins)
    else:
        masks = [loader(i)[1] for i in tqdm(range(len(elements.ids)), desc="metrics: masks", leave=False)]
        summary, per_subject = image_metrics(elements, masks, bins)
    for note in summary["notes"]:
        log.warning("metrics: %s", note)
    report.metrics = summary
    by_id = dict(zip(elements.ids, per_subject))
    for entry in report.subjects:
        for key, value in by_id[entry.id].items():  # label, dice, lesion_voxels_cube
            setattr(entry, key, value)
    patient = np.array([by_id[i]["label"] for i in elements.ids], dtype=bool)
    score_figures(run_dir, report, elements.collection_scores, patient)
    return summary


def evaluate_run(out_dir: str | Path, labels_dir: str | Path, *, force: bool = False, bins: int | None = None) -> dict[str, Any]:
    """Recompute metrics of a finished screen run in `out_dir` against masks in `labels_dir`;
    rewrites report.json, report.html, scores.csv and the score figures (each atomically)."""
    run_dir = Path(out_dir)
    if not run_dir.is_dir():
        raise InputFileError(run_dir, "run folder does not exist")
    layout = RunLayout(run_dir)
    report = read_report_json(layout.report_json)
    elements = RunElements.load(layout.elements)
    matched = match_labels(labels_dir, elements.ids, elements.kind)  # masks that fit no scan: before --force
    labels_now = str(Path(labels_dir).resolve())
    labels_before = report.settings.get("labels")
    # Metrics against the same masks folder are recomputed (edited masks, other bins): nothing is
    # lost that this command cannot rebuild. Metrics against other masks need --force.
    if report.metrics and not force and labels_before != labels_now:
        against = f"against {labels_before}" if labels_before else "against other masks"
        raise InputFileError(layout.report_json, f"already holds metrics {against}; use --force to replace them "
                                                 f"with metrics against {labels_now}")
    for sid, label in matched.items():
        check_label_grid(layout.map_file(sid, elements.kind), label, elements.kind)
        read_mask(label, elements.kind)
    bins = int(bins or report.settings.get("histogram_bins", 65536))
    # Every mask is read and checked (label map, grid) before anything in the run is rewritten.
    attach_metrics(run_dir, report, elements, [matched.get(i) for i in elements.ids], bins)
    report.settings["labels"] = labels_now
    write_run_tables(run_dir, report)
    return report.metrics
