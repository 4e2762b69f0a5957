"""The report's interactive viewer for 2D runs: plain canvas, offline, from the run folder.

`write_viewer2d` writes `OUT/viewer/viewer2d.js` (the page's code) and one small script per shown
image (`viewer/data2d/NNNN.js`) holding three PNGs as base64: the image as the run read it
(RGB, 8 bits), its anomaly map quantised to 8 bits over the run's score range `[low, high]`
(so the threshold slider works in score units: `score = low + code (high - low) / 255`), and its
mask when labels were given. Everything is at the image's own size, reduced to at most
`MAX_SIDE` pixels on the long side (the report is for looking; the exact float map stays in
`maps/<id>.tiff`). Scripts rather than files to fetch, because browsers refuse `fetch()` of
`file://` URLs (a report opened from disk) but load classic `<script src>` tags; PNG data URLs
do not taint a canvas, so the page can read the map's codes back to threshold them. No library:
the page draws on two canvases side by side (the image; the image under the map above the
threshold, the mask outlined in cyan) and lists the ranking to pick from.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.images2d import load_image, read_float_map, resize
from pipelines.labels import read_mask
from pipelines.run_layout import RunLayout
from pipelines.viewer import COMMON_SCRIPT, write_data_scripts

SCRIPT = "viewer2d.js"
DATA_DIR = "data2d"
MAX_SIDE = 768


@dataclass(frozen=True)
class ViewerImage:
    """One image for the viewer: id, input file, float map at the image's size (H, W), optional
    mask file, rank, score, flag, hotspot pixel (row, col)."""

    id: str
    image: Path
    map_path: Path
    label: Path | None
    rank: int
    score: float
    flagged: bool
    hotspot: tuple[int, int]


def _png_b64(array: np.ndarray) -> str:
    """(H, W) or (H, W, 3) uint8 -> base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_shape(shape: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, MAX_SIDE / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _image_data(item: ViewerImage, low: float, high: float) -> dict:
    """The three PNGs of one image, at its display size."""
    image = load_image(item.image)
    shape = _display_shape(image.shape[:2])
    scores = read_float_map(item.map_path)
    if shape != image.shape[:2]:
        image, scores = resize(image, shape), resize(scores, shape)
    span = high - low if high > low else 1.0
    codes = np.clip(np.rint((scores - low) / span * 255), 0, 255).astype(np.uint8)
    data = {
        "width": shape[1], "height": shape[0],
        "image": _png_b64(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)),
        "map": _png_b64(codes),
        "mask": None,
    }
    if item.label is not None:
        mask = read_mask(item.label, "2d")
        if mask.shape != shape:
            mask = resize(mask, shape, nearest=True)
        data["mask"] = _png_b64(mask.astype(np.uint8) * 255)
    return data


def write_viewer2d(layout: RunLayout, images: list[ViewerImage], low: float, high: float, threshold: float) -> None:
    """`viewer2d.js`, one data script per image and `viewer/images2d.js` (the list, rank order).

    `low`/`high`: the run's map range (slider bounds, colour scale); `threshold`: the flag
    threshold, where the slider starts (or at 60 % of the range when nothing reaches it)."""
    items = ((_image_data(item, low, high),
              {"id": item.id, "rank": item.rank, "score": item.score, "flagged": item.flagged,
               "hotspot": list(item.hotspot)})
             for item in images)
    write_data_scripts(layout, (COMMON_SCRIPT, SCRIPT), (DATA_DIR, "volscanViewer2d"),
                       ("images2d.js", "VOLSCAN_IMAGES"), items, (low, high, threshold))


def viewer2d_html(layout: RunLayout) -> str:
    """The report section holding the 2D viewer (scripts referenced relative to report.html)."""
    base = html.escape(layout.relative(layout.viewer))
    return f"""
<div class="viewer2d">
<style>.v2-canvas{{width:384px;max-width:100%;image-rendering:pixelated;background:#000}}</style>
<p><label>map threshold <input id="v2-threshold" type="range"> <span id="v2-threshold-value"></span></label>
<label><input id="v2-mask" type="checkbox" checked> mask outline</label></p>
<div style="display:flex;gap:1em;align-items:flex-start">
<div style="flex:0 0 16em;max-height:560px;overflow:auto"><table id="v2-list"><tr><th>rank</th><th>image</th>
<th>score</th></tr></table></div>
<figure style="margin:0"><canvas id="v2-image" class="v2-canvas"></canvas>
<figcaption class="small">image</figcaption></figure>
<figure style="margin:0"><canvas id="v2-overlay" class="v2-canvas"></canvas>
<figcaption class="small">anomaly map above the threshold (inferno colours, one scale for the run); cyan:
mask</figcaption></figure>
</div>
<p id="v2-status" data-state="loading">loading the viewer ...</p>
<p class="small">Pick an image in the ranking (or use the arrow keys there); the slider is in score units.
A link can open an image at a threshold: <code>report.html#image=ID&amp;threshold=SCORE</code>. Plain canvas
drawing, works offline.</p>
</div>
<script src="{base}/images2d.js"></script>
<script src="{base}/{COMMON_SCRIPT}"></script>
<script src="{base}/{SCRIPT}"></script>
"""
