"""The layout of a `volscan screen` run folder, shared by `screen`, `evaluate` and the report.

    OUT/
      report.html  report.json  scores.csv   the record (see `pipelines.report`)
      elements.npz                           token-grid scores, collection scores, brain masks
      maps/<id>.nii.gz                       anomaly map on the input's own grid (2D: .tiff/.png)
      mappings/<id>.json                     cube <-> input grid (3D; `NativeMapping`)
      figures/*.png                          report figures
      viewer/                                offline interactive viewer (NiiVue bundle + data)

Only this module spells these names; everything else asks it for paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCORES_CSV = "scores.csv"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
ELEMENTS_FILE = "elements.npz"
MAPS_DIR = "maps"
MAPPINGS_DIR = "mappings"
FIGURES_DIR = "figures"
VIEWER_DIR = "viewer"


@dataclass(frozen=True)
class RunLayout:
    """Paths inside the run folder `root` (absolute or the temporary folder being written)."""

    root: Path

    @property
    def report_json(self) -> Path:
        """The machine-readable report."""
        return self.root / REPORT_JSON

    @property
    def report_html(self) -> Path:
        """The page a reader opens."""
        return self.root / REPORT_HTML

    @property
    def scores_csv(self) -> Path:
        """id, score, rank (+ label)."""
        return self.root / SCORES_CSV

    @property
    def elements(self) -> Path:
        """Token-grid scores etc. kept for `volscan evaluate`."""
        return self.root / ELEMENTS_FILE

    @property
    def figures(self) -> Path:
        """Folder of report figures."""
        return self.root / FIGURES_DIR

    @property
    def viewer(self) -> Path:
        """Folder of the offline viewer's assets and data."""
        return self.root / VIEWER_DIR

    def mapping(self, sid: str) -> Path:
        """`NativeMapping` JSON of subject `sid` (3D runs)."""
        return self.root / MAPPINGS_DIR / f"{sid}.json"

    def map_file(self, sid: str, kind: str) -> Path:
        """The float anomaly map of `sid` on its input's grid: NIfTI (3D) or TIFF (2D)."""
        return self.root / MAPS_DIR / (f"{sid}.nii.gz" if kind == "3d" else f"{sid}.tiff")

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder, with forward slashes (for links in the report)."""
        return path.relative_to(self.root).as_posix()
