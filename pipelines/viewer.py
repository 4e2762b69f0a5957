"""The report's interactive viewer: NiiVue, vendored, working offline from the run folder.

`write_viewer` copies the NiiVue UMD bundle and `viewer.js` into `OUT/viewer/` and writes one
small script per scan (`viewer/data/NNNN.js`) holding the scan, its anomaly map and mask as
base64 gzipped NIfTI. Scripts rather than .nii.gz files because browsers block `fetch()` of
`file://` URLs (a report opened from disk) but load classic `<script src>` tags; a UMD build
rather than the ES module for the same reason. The map is stored for the viewer as uint8 with
the NIfTI scale slope/intercept, so the threshold slider works in score units while the file
stays ~4x smaller than float32; the scan itself is embedded as stored (its .nii.gz bytes).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.run_layout import RunLayout
from volumetric.atomic_files import atomic_write_bytes

NIIVUE_VERSION = "0.69.0"
ASSETS = Path(__file__).with_name("viewer_assets")
BUNDLE = "niivue.umd.js"
COMMON_SCRIPT = "viewer_common.js"  # shared with the 2D viewer (pipelines.viewer2d)
STATIC_FILES = (BUNDLE, "NIIVUE_LICENSE.txt", COMMON_SCRIPT, "viewer.js")


@dataclass(frozen=True)
class ViewerScan:
    """One scan for the viewer: its input file, native-grid anomaly map, optional mask,
    rank, flag and hotspot (RAS mm)."""

    id: str
    image: Path
    map_path: Path
    label: Path | None
    rank: int
    flagged: bool
    hotspot_mm: tuple[float, float, float] | None


def _nifti_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return data if data[:2] == b"\x1f\x8b" else gzip.compress(data, compresslevel=6)


def _quantised_map(path: Path, low: float, high: float) -> bytes:
    """The float map as uint8 with scl_slope/scl_inter mapping back to [low, high]."""
    import nibabel as nib

    image = nib.load(str(path))
    values = np.asarray(image.dataobj, dtype=np.float32)
    scale = (high - low) / 255.0 or 1.0
    codes = np.clip(np.rint((values - low) / scale), 0, 255).astype(np.uint8)
    out = nib.Nifti1Image(codes, image.affine, header=image.header)
    out.header.set_data_dtype(np.uint8)
    out.header.set_slope_inter(scale, low)
    return gzip.compress(out.to_bytes(), compresslevel=6)


def _mask(path: Path) -> bytes:
    import nibabel as nib

    image = nib.load(str(path))
    mask = (np.asarray(image.dataobj) > 0).astype(np.uint8)
    out = nib.Nifti1Image(mask, image.affine)
    out.header.set_qform(image.header.get_qform(), code=int(image.header["qform_code"]))
    out.header.set_sform(image.header.get_sform(), code=int(image.header["sform_code"]))
    return gzip.compress(out.to_bytes(), compresslevel=6)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_viewer(layout: RunLayout, scans: list[ViewerScan], low: float, high: float, threshold: float) -> None:
    """Static assets + per-scan data scripts + `viewer/scans.js` (the list) under `layout.viewer`.

    `low`/`high`: the cohort's map range (slider bounds); `threshold`: the flag threshold."""
    items = (
        ({"image": _b64(_nifti_gz(scan.image)), "map": _b64(_quantised_map(scan.map_path, low, high)),
          "label": _b64(_mask(scan.label)) if scan.label is not None else None},
         {"id": scan.id, "rank": scan.rank, "flagged": scan.flagged,
          "hotspot_mm": None if scan.hotspot_mm is None else [round(v, 2) for v in scan.hotspot_mm]})
        for scan in scans
    )
    write_data_scripts(layout, STATIC_FILES, ("data", "volscanViewer"), ("scans.js", "VOLSCAN_SCANS"), items,
                       (low, high, threshold))


def write_data_scripts(
    layout: RunLayout, static: tuple[str, ...], data: tuple[str, str], manifest: tuple[str, str],
    items: Iterable[tuple[dict, dict]], scale: tuple[float, float, float],
) -> None:
    """What a viewer needs under `layout.viewer`: the `static` asset files, one script per item
    (`data = (folder, registry)`: `<folder>/NNNN.js` calling `registry.register(index, payload)`)
    and the list of items (`manifest = (file, variable)`: `window.<variable> = [...]`, each entry
    with its script's `file`, the map range `low`, `high` and the slider's start `threshold`).

    `items`: (payload, entry) pairs, made one at a time; `scale`: (low, high, flag threshold). The
    slider starts at the flag threshold; when nothing reaches it (no scan flagged), at 60 % of the
    cohort's range, so the hottest parts still show."""
    folder = layout.viewer
    (folder / data[0]).mkdir(parents=True, exist_ok=True)
    for name in static:
        shutil.copyfile(ASSETS / name, folder / name)
    low, high, threshold = scale
    start = threshold if low <= threshold < high else low + 0.6 * (high - low)
    listed = []
    for index, (payload, entry) in enumerate(items):
        name = f"{data[0]}/{index:04d}.js"
        atomic_write_bytes(folder / name, f"{data[1]}.register({index}, {json.dumps(payload)});\n".encode())
        listed.append({**entry, "file": f"{layout.relative(folder)}/{name}", "low": low, "high": high,
                       "threshold": start})
    atomic_write_bytes(folder / manifest[0], f"window.{manifest[1]} = {json.dumps(listed)};\n".encode())


def viewer_html(layout: RunLayout) -> str:
    """The report section holding the viewer (scripts referenced relative to report.html)."""
    base = html.escape(layout.relative(layout.viewer))
    return f"""
<div class="viewer">
<p><label>scan <select id="vs-scan"></select></label>
<label>map threshold <input id="vs-threshold" type="range"> <span id="vs-threshold-value"></span></label></p>
<div class="vs-frame"><canvas id="vs-canvas"></canvas></div>
<p id="vs-status" data-state="loading">loading the viewer ...</p>
<p class="small">Drag in a plane to move the crosshair; scroll to change slice. Warm colours: anomaly map
above the threshold; blue: mask (when labels were given). Viewer: NiiVue {NIIVUE_VERSION} (BSD-2,
<a href="{base}/NIIVUE_LICENSE.txt">licence</a>), bundled, works offline.</p>
</div>
<script src="{base}/{BUNDLE}"></script>
<script src="{base}/scans.js"></script>
<script src="{base}/{COMMON_SCRIPT}"></script>
<script src="{base}/viewer.js"></script>
"""


# Must come before any other script so that errors of the viewer are recorded in the page
# (the browser test reads them; a reader sees them under the viewer).
ERROR_CAPTURE = """<script>
window.volscanErrors = [];
window.addEventListener("error", (e) => window.volscanErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.volscanErrors.push(String(e.reason)));
(function () { const original = console.error; console.error = function (...args) {
  window.volscanErrors.push(args.map(String).join(" ")); original.apply(console, args); }; })();
</script>"""
