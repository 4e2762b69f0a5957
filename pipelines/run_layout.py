"""The layout of a `volscan screen` run folder, shared by `screen`, `evaluate` and the report.

    OUT/
      report.html  report.json  scores.csv   the record (see `pipelines.report`)
      elements.npz                           token-grid scores, collection scores, brain masks
      cohort.npz                             token-cache keys and CoDeGraph exclusions (`--reference`)
      maps/<id>.nii.gz                       anomaly map on the input's own grid (2D: <id>.tiff,
                                             <id>_heat.png, <id>_overlay.png)
      mappings/<id>.json                     cube <-> input grid (3D; `NativeMapping`)
      figures/*.png                          report figures (rank001_<id>.png: top-ranked scans)
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
COHORT_FILE = "cohort.npz"
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
    def cohort(self) -> Path:
        """What a later `--reference` screen reads: token keys, CoDeGraph exclusions."""
        return self.root / COHORT_FILE

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

    def heat_picture(self, sid: str) -> Path:
        """Colour heat map PNG of 2D subject `sid`."""
        return self.root / MAPS_DIR / f"{sid}_heat.png"

    def overlay_picture(self, sid: str) -> Path:
        """Heat map over the image, PNG, of 2D subject `sid`."""
        return self.root / MAPS_DIR / f"{sid}_overlay.png"

    def panel(self, rank: int, sid: str) -> Path:
        """Figure of the scan ranked `rank` (1 = most suspicious)."""
        return self.root / FIGURES_DIR / f"rank{rank:03d}_{sid}.png"

    def id_file_names(self, sid: str, n_subjects: int) -> list[str]:
        """Every file name this layout derives from id `sid` in a run of `n_subjects` (the
        largest rank has the most digits); what bounds the length of an id."""
        return [path.name for path in (self.map_file(sid, "3d"), self.map_file(sid, "2d"), self.mapping(sid),
                                       self.heat_picture(sid), self.overlay_picture(sid),
                                       self.panel(n_subjects, sid))]

    def relative(self, path: Path) -> str:
        """`path` relative to the run folder, with forward slashes (for links in the report)."""
        return path.relative_to(self.root).as_posix()
