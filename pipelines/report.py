"""A run's record and its machine-readable files: `Report`, scores.csv and report.json.

`report.json` holds the whole record (settings, timings per stage, ranking, CoDeGraph
communities, excluded-element share, metrics, figure paths); scores.csv the ranking. Ids are
written safely (`pipelines.safe_text`): CSV cells a spreadsheet would run as a formula get a
leading `'` (removed again by `read_scores_csv`). The record is built by
`pipelines.report_build` and rendered as report.html by `pipelines.report_html`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.run_folder import atomic_write_text
from pipelines.safe_text import csv_cell, csv_value
from volumetric.errors import InputFileError


@dataclass(frozen=True)
class ScoreRow:
    """One line of scores.csv: rank 1 = most suspicious; `label` None when unknown."""

    id: str
    score: float
    rank: int
    label: int | None = None


@dataclass
class ScanEntry:
    """One scan of the ranking in the report (see docs/screen.md for every field): `image`
    absolute; `map`, `map_files`, `panel` relative to the run folder; `hotspot` as
    `pipelines.hotspots.Hotspot.to_dict`; `label`, `dice`, `lesion_voxels_cube` once metrics exist."""

    id: str
    rank: int
    score: float
    percentile: float
    flagged: bool
    image: str
    map: str
    map_files: list[str]
    hotspot: dict[str, Any]
    label_file: str | None = None
    brain_mask: str | None = None  # the extractor used for this scan (3D; what `auto` resolved to)
    panel: str | None = None
    label: int | None = None
    dice: float | None = None
    lesion_voxels_cube: int | None = None


@dataclass
class Report:
    """The record of a screen run: built by `pipelines.report_build.build_report`, completed by
    the later stages (metrics, figures, viewer, timings) and `volscan evaluate`, rendered to
    report.json (`to_dict`) and report.html (`pipelines.report_html.report_html`)."""

    volscan_version: str = "unknown"
    created: str = ""
    input: str = ""
    output: str = ""
    kind: str = "3d"
    n_subjects: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # `pipelines.cache_files.run_usage`
    scoring: dict[str, Any] = field(default_factory=dict)
    token_grid: list[int] = field(default_factory=list)
    codegraph: dict[str, Any] | None = None
    excluded_fraction: float = 0.0
    subjects: list[ScanEntry] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    figures: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    viewer: list[str] = field(default_factory=list)
    methods: str = ""  # `pipelines.methods_text.methods_paragraph`
    reference: dict[str, Any] | None = None  # `--reference` runs: `pipelines.reference.ReferenceRun.annotate`

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (what report.json holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "report") -> "Report":
        """Inverse of `to_dict`; an unknown or malformed field is an `InputFileError` naming `source`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputFileError(source, f"unknown report field '{unknown[0]}' (written by another volscan version?)")
        try:
            values = dict(data)
            values["subjects"] = [ScanEntry(**entry) for entry in data.get("subjects", [])]
            return cls(**values)
        except TypeError as exc:
            raise InputFileError(source, f"malformed report ({exc})") from None


def rank_scores(ids: Sequence[str], scores: Sequence[float], labels: Sequence[int] | None = None) -> list[ScoreRow]:
    """Rows sorted by descending score (ties broken by id, so the order is reproducible)."""
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))
    return [
        ScoreRow(ids[i], float(scores[i]), rank + 1, None if labels is None else int(labels[i]))
        for rank, i in enumerate(order)
    ]


def scores_csv_text(rows: Sequence[ScoreRow]) -> str:
    """`id,score,rank` (+ `label` when every row has one) as CSV text; ids through `csv_cell`."""
    with_label = bool(rows) and all(row.label is not None for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "score", "rank"] + (["label"] if with_label else []))
    for row in rows:
        writer.writerow([csv_cell(row.id), f"{row.score:.9g}", row.rank] + ([row.label] if with_label else []))
    return buffer.getvalue()


def write_scores_csv(path: Path, rows: Sequence[ScoreRow]) -> None:
    """Atomically write scores.csv."""
    atomic_write_text(path, scores_csv_text(rows))


def read_scores_csv(path: Path) -> list[ScoreRow]:
    """Rows of an existing scores.csv, in file order."""
    if not path.is_file():
        raise InputFileError(path, "not found; is this a volscan screen output folder?")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"id", "score", "rank"} <= set(reader.fieldnames):
            raise InputFileError(path, "expected columns id,score,rank")
        try:
            return [
                ScoreRow(csv_value(r["id"]), float(r["score"]), int(r["rank"]), int(r["label"]) if r.get("label") else None)
                for r in reader
            ]
        except ValueError as exc:
            raise InputFileError(path, f"malformed row ({exc})") from None


def json_safe(value: Any) -> Any:
    """`value` as JSON can hold it: NaN/inf -> None, paths -> str, numpy/torch scalars -> Python."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def report_json_text(report: Report) -> str:
    """The report as indented JSON (NaN/inf become null)."""
    return json.dumps(json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n"


def read_report_json(path: Path) -> Report:
    """The report of an existing run (report.json)."""
    if not path.is_file():
        raise InputFileError(path, "not found; is this a volscan screen output folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, "not a volscan report (expected a JSON object)")
    return Report.from_dict(data, path)

def report_rows(report: Report) -> list[ScoreRow]:
    """The ranking of a report dictionary as `ScoreRow`s, in report order."""
    return [ScoreRow(s.id, s.score, s.rank, s.label) for s in report.subjects]
