"""PNG figures of a screen run (matplotlib, Agg canvas; no pyplot global state, no display).

- `roc_figure`: ROC curve of the collection scores against labels.
- `histogram_figure`: collection-score histogram, by class when labels are known.
- `montage_figure`: three orthogonal slices through the hottest point of a 3D map (or the 2D
  image) with the map overlaid and the mask outlined; one per top-ranked scan.
- `community_figure`: the CoDeGraph collection graph, nodes coloured by Leiden community,
  outlier (consistent-anomaly) communities drawn large with a red edge.
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


def _slices(volume: np.ndarray, point: Sequence[int]) -> list[np.ndarray]:
    # Rotated so that the second/third array axes read as image rows going up.
    return [np.rot90(volume[point[0], :, :]), np.rot90(volume[:, point[1], :]), np.rot90(volume[:, :, point[2]])]


def montage_figure(
    image: np.ndarray,
    score_map: np.ndarray,
    title: str,
    path: Path,
    *,
    mask: np.ndarray | None = None,
    low: float = 0.0,
    high: float = 1.0,
    region: np.ndarray | None = None,
) -> Path:
    """Scan (S,S,S) or (H,W[,3]) with `score_map` (same spatial shape) overlaid on the colour
    scale `[low, high]`, mask outlined in cyan; 3D: three slices through the map's maximum
    inside `region` (e.g. the brain mask; the whole volume when None or empty)."""
    score_map = np.nan_to_num(np.asarray(score_map, dtype=np.float32))
    if score_map.ndim == 3:
        inside = score_map if region is None or not np.any(region) else np.where(region, score_map, -np.inf)
        point = np.unravel_index(int(np.argmax(inside)), score_map.shape)
        images, maps = _slices(image, point), _slices(score_map, point)
        masks = _slices(mask, point) if mask is not None else [None] * 3
        names = ["sagittal", "coronal", "axial"]
    else:
        images, maps, masks, names = [image], [score_map], [mask], [""]
    figure = Figure(figsize=(3.2 * len(images), 3.4))
    for i, (img, heat, outline, name) in enumerate(zip(images, maps, masks, names)):
        ax = figure.add_subplot(1, len(images), i + 1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        shown = ax.imshow(heat, cmap=OVERLAY_CMAP, vmin=low, vmax=high, alpha=0.45, interpolation="nearest")
        if outline is not None and np.any(outline) and not np.all(outline):
            ax.contour(outline.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    figure.colorbar(shown, ax=figure.axes, fraction=0.025, pad=0.02)
    figure.suptitle(title, fontsize=10)
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
    for v in outliers:
        ax.annotate(names[v], coords[v], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"CoDeGraph: {len(communities)} communities, "
                 f"{len(outlier_communities)} outlier (large, red outline)")
    return _save(figure, path)
