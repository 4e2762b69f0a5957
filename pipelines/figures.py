"""PNG figures of a screen run (matplotlib, Agg canvas; no pyplot global state, no display).

- `roc_figure`: ROC curve of the collection scores against labels.
- `histogram_figure`: collection-score histogram, by class when labels are known.
- `native_panel_figure`: three orthogonal planes of a scan in its own space (reoriented to the
  closest RAS axes, no resampling) through its hotspot, pixels drawn at the voxel spacing,
  orientation letters, map overlaid, above-threshold region and mask outlined.
- `montage_figure`: a 2D image with its map overlaid and the mask outlined.
- `community_figure`: the CoDeGraph collection graph, nodes coloured by Leiden community and
  named by scan id, outlier (consistent-anomaly) communities drawn large with a red edge.

Text holding scan ids is drawn literally (`LITERAL`: no mathtext, no TeX): an id is a file
name, and `$` in it must be a dollar sign, not the start of a formula matplotlib may fail to parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import igraph as ig
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from volumetric.atomic_files import atomic_path

DPI = 100
OVERLAY_CMAP = "inferno"
# Text properties for strings from file names (see the module docstring).
LITERAL = {"parse_math": False, "usetex": False}


def _save(figure: Figure, path: Path) -> Path:
    # Temporary name then rename: `volscan evaluate` redraws figures inside a finished run.
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def roc_figure(scores: np.ndarray, labels: np.ndarray, auroc: float, path: Path) -> Path:
    """ROC curve of `scores` (N,) against binary `labels` (N,), titled with `auroc`."""
    fpr, tpr, _ = roc_curve(np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64))
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.add_subplot()
    ax.plot(fpr, tpr, color="tab:red", lw=2, label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("Collection-level ROC")
    ax.legend(loc="lower right")
    return _save(figure, path)


def histogram_figure(scores: np.ndarray, labels: np.ndarray | None, path: Path) -> Path:
    """Histogram of collection scores (N,), split into healthy / lesion when `labels` given."""
    scores = np.asarray(scores, dtype=np.float64)
    figure = Figure(figsize=(6, 3.5))
    ax = figure.add_subplot()
    edges = np.histogram_bin_edges(scores, bins=min(30, max(5, scores.size // 2)))
    if labels is None:
        ax.hist(scores, bins=edges, color="tab:blue", alpha=0.8, label="all")
    else:
        labels = np.asarray(labels, dtype=bool)
        ax.hist(scores[~labels], bins=edges, color="tab:blue", alpha=0.6, label=f"no lesion ({(~labels).sum()})")
        ax.hist(scores[labels], bins=edges, color="tab:red", alpha=0.6, label=f"lesion ({labels.sum()})")
    ax.set(xlabel="collection score (max of map)", ylabel="number of scans")
    ax.legend()
    return _save(figure, path)


def montage_figure(
    image: np.ndarray,
    score_map: np.ndarray,
    title: str,
    path: Path,
    *,
    mask: np.ndarray | None = None,
    low: float = 0.0,
    high: float = 1.0,
) -> Path:
    """2D image (H, W[, 3]) with `score_map` (H, W) overlaid on the colour scale `[low, high]`,
    mask (H, W) outlined in cyan."""
    score_map = np.nan_to_num(np.asarray(score_map, dtype=np.float32))
    figure = Figure(figsize=(4.2, 3.6))
    ax = figure.add_subplot()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    shown = ax.imshow(score_map, cmap=OVERLAY_CMAP, vmin=low, vmax=high, alpha=0.45, interpolation="nearest")
    if mask is not None and np.any(mask) and not np.all(mask):
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_axis_off()
    figure.colorbar(shown, ax=figure.axes, fraction=0.04, pad=0.02)
    figure.suptitle(title, fontsize=10, **LITERAL)
    return _save(figure, path)


# Plane name, the RAS axis held fixed, and (letters left/right/bottom/top) of the displayed
# plane in the radiological convention ITK-SNAP and 3D Slicer use: patient's right on the
# viewer's left in coronal and axial planes.
_PLANES = (("sagittal", 0, ("P", "A", "I", "S")), ("coronal", 1, ("R", "L", "I", "S")), ("axial", 2, ("R", "L", "P", "A")))


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(rows bottom-to-top, columns left-to-right) of the plane `axis` = `index` of a RAS-ordered
    volume, for `imshow(origin="lower")`: vertical = the later axis; x (R->L) flipped so the
    patient's right is on the left."""
    plane = np.take(volume, index, axis=axis).T
    return plane[:, ::-1] if axis != 0 else plane


def native_panel_figure(
    image: np.ndarray,
    score_map: np.ndarray,
    affine: np.ndarray,
    hotspot: Sequence[int],
    title: str,
    path: Path,
    *,
    mask: np.ndarray | None = None,
    low: float = 0.0,
    high: float = 1.0,
    threshold: float = float("inf"),
) -> Path:
    """Sagittal, coronal and axial planes of a scan (I, J, K) with its `affine` (4, 4, RAS mm)
    through native voxel `hotspot`, in the scan's own grid: axes only permuted/flipped to the
    closest RAS order, each pixel drawn at its voxel spacing (mm), orientation letters on
    every side, `score_map` (I, J, K) overlaid on `[low, high]`, its above-`threshold` region
    outlined in yellow, `mask` (I, J, K) outlined in cyan, crosshair on the hotspot."""
    import nibabel.orientations as orientations

    ornt = orientations.io_orientation(affine)
    shape = np.asarray(image).shape[:3]
    reorient = orientations.inv_ornt_aff(ornt, shape)  # RAS-ordered voxel -> native voxel

    def ras(volume: np.ndarray) -> np.ndarray:
        return orientations.apply_orientation(np.asarray(volume), ornt)

    volumes = [ras(np.asarray(image, dtype=np.float32)), ras(np.nan_to_num(np.asarray(score_map, np.float32)))]
    outline = ras(np.asarray(mask, dtype=bool)) if mask is not None else None
    point = np.linalg.solve(reorient, np.r_[np.asarray(hotspot, dtype=float), 1.0])[:3].round().astype(int)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))[np.argsort(ornt[:, 0])]
    inside = volumes[0][volumes[0] > 0]
    vmin, vmax = np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0)
    figure = Figure(figsize=(11, 4.0))
    shown = None
    for column, (name, axis, letters) in enumerate(_PLANES):
        ax = figure.add_subplot(1, 3, column + 1)
        h_axis, v_axis = [a for a in range(3) if a != axis]
        extent = (0, volumes[0].shape[h_axis] * spacing[h_axis], 0, volumes[0].shape[v_axis] * spacing[v_axis])
        ax.imshow(_plane(volumes[0], axis, point[axis]), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  extent=extent, interpolation="nearest")
        heat = _plane(volumes[1], axis, point[axis])
        shown = ax.imshow(np.ma.masked_less_equal(heat, low), cmap=OVERLAY_CMAP, vmin=low, vmax=high, alpha=0.5,
                          origin="lower", extent=extent, interpolation="nearest")
        if np.isfinite(threshold) and (heat > threshold).any():
            ax.contour(heat > threshold, levels=[0.5], colors="yellow", linewidths=0.9, origin="lower", extent=extent)
        if outline is not None:
            cut = _plane(outline, axis, point[axis])
            if cut.any():
                ax.contour(cut.astype(float), levels=[0.5], colors="cyan", linewidths=0.9, origin="lower", extent=extent)
        # Crosshair through the hotspot (pixel centres; x is displayed flipped).
        h_index = point[h_axis] if h_axis != 0 else volumes[0].shape[0] - 1 - point[0]
        ax.axvline((h_index + 0.5) * spacing[h_axis], color="lime", lw=0.6, alpha=0.8)
        ax.axhline((point[v_axis] + 0.5) * spacing[v_axis], color="lime", lw=0.6, alpha=0.8)
        for text, xy, align in zip(letters, ((0.01, 0.5), (0.99, 0.5), (0.5, 0.01), (0.5, 0.99)),
                                   (("left", "center"), ("right", "center"), ("center", "bottom"), ("center", "top"))):
            ax.text(*xy, text, transform=ax.transAxes, color="white", fontsize=11, fontweight="bold",
                    ha=align[0], va=align[1])
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    figure.colorbar(shown, ax=figure.axes, fraction=0.015, pad=0.01, label="anomaly score")
    figure.suptitle(title, fontsize=10, **LITERAL)
    return _save(figure, path)


def community_figure(
    graph: ig.Graph,
    communities: Sequence[Sequence[int]],
    outlier_communities: Sequence[int],
    names: Sequence[str],
    path: Path,
    seed: int = 0,
) -> Path:
    """Collection graph (vertex i = collection i, edge weight = suspicious links) by community."""
    figure = Figure(figsize=(6.5, 6.5))
    ax = figure.add_subplot()
    ax.set_axis_off()
    n = graph.vcount()
    if n == 0:
        ax.text(0.5, 0.5, "empty graph", ha="center")
        return _save(figure, path)
    membership = np.full(n, -1)
    for index, members in enumerate(communities):
        membership[list(members)] = index
    weights = graph.es["weight"] if graph.ecount() and "weight" in graph.es.attributes() else None
    # Kamada-Kawai is deterministic from its start positions: seeded start, same picture each run.
    start = np.random.default_rng(seed).random((n, 2)).tolist()
    coords = np.asarray(graph.layout_kamada_kawai(seed=start).coords, dtype=float)
    top_weight = max(weights) if weights else 1.0
    for edge_index, edge in enumerate(graph.es):
        a, b = edge.tuple
        width = 0.3 + 2.5 * (weights[edge_index] / top_weight if weights else 0.5)
        ax.plot(*coords[[a, b]].T, color="grey", lw=width, alpha=0.5, zorder=1)
    # tab20 without its two reds: red is reserved for the outline of outlier communities.
    palette = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i not in (6, 7)]
    colours = [palette[m % len(palette)] if m >= 0 else (0.7, 0.7, 0.7) for m in membership]
    outliers = {v for c in outlier_communities for v in communities[c]}
    sizes = [140 if v in outliers else 50 for v in range(n)]
    edges = ["red" if v in outliers else "black" for v in range(n)]
    ax.scatter(coords[:, 0], coords[:, 1], s=sizes, c=colours, edgecolors=edges, linewidths=1.2, zorder=2)
    for v in range(n):  # every node named: the reader looks for a scan id
        ax.annotate(names[v], coords[v], fontsize=7 if v in outliers else 6, xytext=(4, 4), textcoords="offset points",
                    color="darkred" if v in outliers else "black", **LITERAL)
    ax.set_title(f"CoDeGraph: {len(communities)} communities, "
                 f"{len(outlier_communities)} outlier (large, red outline)")
    return _save(figure, path)
