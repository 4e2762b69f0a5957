"""Stage 5 of `volscan screen` (scan maps): scores to files a reader uses.

- maps: token scores upsampled to the cube (void -> 0), then `NativeMapping.to_native` onto
  each input's own grid and kept inside the brain mask there (`pipelines.maps.native_brain_map`),
  saved with the input's affine and qform/sform codes (float32);
  2D: float TIFF + heat-map PNG + overlay PNG at the image's own size;
- hotspots: each map's maximum inside the brain mask in native voxels and RAS mm, the
  above-threshold region (`pipelines.hotspots`);
- figures: per-scan panels in the scan's own space through its hotspot (3D) or overlays (2D)
  for the top-ranked scans, the CoDeGraph community graph;
- the offline viewer (`pipelines.viewer` for 3D, `pipelines.viewer2d` for 2D).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pipelines.evaluate import RunElements
from pipelines.figures import community_figure, montage_figure, native_panel_figure
from pipelines.hotspots import Hotspot, find_hotspot
from pipelines.images2d import load_image, read_float_map, resize, write_float_map, write_map_pictures
from pipelines.labels import read_mask
from pipelines.maps import native_brain_map, save_map_like, score_range, upsample_scores
from pipelines.report import ScanEntry
from pipelines.run_layout import RunLayout
from pipelines.stages.preprocess import Prepared
from pipelines.stages.score import Scores
from pipelines.subjects import Subject, nifti_grid
from pipelines.viewer import ViewerScan, write_viewer
from pipelines.viewer2d import ViewerImage, write_viewer2d

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapFiles:
    """Per subject id: the map files written (run-relative) and the hotspot found."""

    files: dict[str, list[str]]
    hotspots: dict[str, Hotspot]


def write_maps(
    layout: RunLayout, subjects: list[Subject], elements: RunElements, prepared: Prepared, threshold: float
) -> MapFiles:
    """Native-grid anomaly maps of every subject and their hotspots (see the module docstring)."""
    files: dict[str, list[str]] = {}
    hotspots: dict[str, Hotspot] = {}
    low, high = score_range(elements.element_scores)
    for i, subject in enumerate(tqdm(subjects, desc="maps", unit="map")):
        square = upsample_scores(elements.element_scores[i], elements.size)
        path = layout.map_file(subject.id, elements.kind)
        path.parent.mkdir(exist_ok=True)
        if elements.kind == "3d":
            mapping = prepared.mappings[i]
            native, brain = native_brain_map(square, mapping, elements.brain_mask(i))
            save_map_like(native, subject.image, path)
            layout.mapping(subject.id).parent.mkdir(exist_ok=True)
            mapping.save(layout.mapping(subject.id))
            files[subject.id] = [layout.relative(path)]
            # The affine the map was saved with (the input's own header), so the voxel indices
            # and millimetres agree with what a viewer shows for the input file.
            hotspots[subject.id] = find_hotspot(native, threshold, nifti_grid(subject.image)[1], region=brain)
        else:
            image = load_image(subject.image)
            native = resize(square, image.shape[:2])
            heat, overlay = layout.heat_picture(subject.id), layout.overlay_picture(subject.id)
            write_float_map(native, path)
            write_map_pictures(image, native, heat, overlay, low, high)
            files[subject.id] = [layout.relative(p) for p in (path, heat, overlay)]
            hotspots[subject.id] = find_hotspot(native, threshold)
    return MapFiles(files, hotspots)


def scan_panels(
    layout: RunLayout, ranked: list[ScanEntry], subjects: list[Subject], elements: RunElements, threshold: float,
    top: int,
) -> dict[str, str]:
    """{subject id: run-relative PNG} for the `top` ranked entries of the report: native-space
    panels through the hotspot (3D) or the image with its map (2D); masks outlined."""
    by_id = {s.id: s for s in subjects}
    low, high = score_range(elements.element_scores)
    layout.figures.mkdir(exist_ok=True)
    panels = {}
    for entry in ranked[:top]:
        subject = by_id[entry.id]
        path = layout.panel(entry.rank, subject.id)
        hotspot = entry.hotspot
        where = (f"hotspot {', '.join(f'{v:.1f}' for v in hotspot['world_mm_ras'])} mm RAS, voxel "
                 f"{tuple(hotspot['voxel'])}" if hotspot["world_mm_ras"] else f"hotspot pixel {tuple(hotspot['voxel'])}")
        title = f"rank {entry.rank}: {subject.id} (score {entry.score:.4g}); {where}"
        if elements.kind == "3d":
            image = nib.load(str(subject.image))
            volume = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
            score_map = np.asarray(nib.load(str(layout.map_file(subject.id, "3d"))).dataobj, dtype=np.float32)
            mask = read_mask(subject.label, "3d") if subject.label is not None else None
            native_panel_figure(volume, score_map, image.affine, hotspot["voxel"], title, path, mask=mask,
                                low=low, high=high, threshold=threshold)
        else:
            mask = read_mask(subject.label, "2d") if subject.label is not None else None
            montage_figure(load_image(subject.image), read_float_map(layout.map_file(subject.id, "2d")), title, path,
                           mask=mask, low=low, high=high)
        panels[subject.id] = layout.relative(path)
    return panels


def community_graph(layout: RunLayout, scores: Scores, ids: list[str], seed: int) -> str | None:
    """Run-relative PNG of the CoDeGraph collection graph, or None (MuSc has no graph)."""
    if scores.graph is None:
        return None
    path = layout.figures / "communities.png"
    layout.figures.mkdir(exist_ok=True)
    community_figure(scores.graph, scores.communities, scores.outlier_communities, ids, path, seed=seed)
    return layout.relative(path)


def write_viewer_files(
    layout: RunLayout, ranked: list[ScanEntry], subjects: list[Subject], elements: RunElements, threshold: float,
    limit: int,
) -> list[str]:
    """The offline viewer (NiiVue for 3D, `pipelines.viewer2d` for 2D) with the `limit` top-ranked
    scans plus every flagged one, in rank order; returns their ids."""
    by_id = {s.id: s for s in subjects}
    shown = [entry for entry in ranked if entry.rank <= limit or entry.flagged]
    if elements.kind == "2d":
        items = [ViewerImage(entry.id, by_id[entry.id].image, layout.map_file(entry.id, "2d"), by_id[entry.id].label,
                             entry.rank, entry.score, entry.flagged, tuple(entry.hotspot["voxel"]))
                 for entry in shown]
        write_viewer2d(layout, items, *score_range(elements.element_scores), threshold)
        return [item.id for item in items]
    scans = [
        ViewerScan(entry.id, by_id[entry.id].image, layout.map_file(entry.id, "3d"), by_id[entry.id].label,
                   entry.rank, entry.flagged, tuple(entry.hotspot["world_mm_ras"]))
        for entry in shown
    ]
    write_viewer(layout, scans, *score_range(elements.element_scores), threshold)
    return [scan.id for scan in scans]
