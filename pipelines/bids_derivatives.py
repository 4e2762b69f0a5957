"""A screen run written as a BIDS Derivatives dataset (`volscan bids ... group`).

Layout (BIDS Derivatives, "Common data types": `<source_entities>[_space-<space>][_desc-<label>]
_<suffix>.<extension>`, entities in the spec's order):

    OUTPUT_DIR/
      dataset_description.json     DatasetType "derivative", GeneratedBy (volscan, version),
                                   SourceDatasets and DatasetLinks {"raw": the BIDS dataset}
      desc-scores_<S>.tsv / .json  one row per scan (participant_id, session_id, scan_id, source,
                                   score, rank, percentile, flagged, map) + column descriptions
      sub-X/[ses-Y/]anat/<source entities>_space-<S>_desc-anomaly_map.nii.gz / .json
      volscan/<S>/                 the full volscan run (report.html, scores.csv, figures...)
      .bidsignore                  `volscan/`: the run is not BIDS data

`<S>` is the screened suffix (T1w, T2w, FLAIR). The map lies on its source scan's grid, so
`space-<S>` names the scan's own space (as fMRIPrep's `space-T1w`), and the sidecar's
`SpatialReference` (REQUIRED for a space that is not a standard template) and `Sources` give the
exact raw file as a BIDS URI (`bids:raw:sub-01/anat/sub-01_T1w.nii.gz`). `map` is not a raw
suffix and `desc`/`space` are not raw anat entities, so no derivative name is a permissible raw
name (the derivatives rule that keeps them from being taken for raw data).

`check_derivative_names` checks a derivatives folder against these rules (the npm
`bids-validator` 1.x validates raw datasets only: it reports every derivative file, the spec's
own examples included, as NOT_INCLUDED).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.bids import (
    ANAT_ENTITIES, DATATYPE, DESCRIPTION_FILE, ENTITY_ORDER, LABEL, BidsScan, join_entities, parse_name,
)
from volumetric.errors import InputFileError
from volumetric.hashing import volscan_version

BIDS_VERSION = "1.10.0"
PIPELINE = "volscan"
MAP_DESC, MAP_SUFFIX = "anomaly", "map"
RUN_FOLDER = "volscan"
DERIVATIVE_ENTITIES = ANAT_ENTITIES + ("space", "desc")

SCORE_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "participant (sub-<label>)"},
    "session_id": {"Description": "session (ses-<label>), n/a without sessions"},
    "scan_id": {"Description": "volscan's scan id: the source file's entities"},
    "source": {"Description": "the source scan as a BIDS URI"},
    "score": {"Description": "anomaly score: the scan's highest token score; higher = more unusual within this "
                             "cohort", "Units": "arbitrary"},
    "rank": {"Description": "rank of the score in the cohort, 1 = most suspicious"},
    "percentile": {"Description": "rank as a percentile of the cohort: 100 = most suspicious", "Units": "%"},
    "flagged": {"Description": "whether the score is above the cohort's flag threshold (robust z-score rule)",
                "Levels": {"true": "flagged as an outlier of this cohort", "false": "not flagged"}},
    "map": {"Description": "the anomaly map of the scan, relative to this dataset's root"},
}


def map_name(scan: BidsScan) -> str:
    """The map's file name: source entities + `space-<suffix>` + `desc-anomaly`, suffix `map`."""
    entities = dict(scan.entities) | {"space": scan.suffix, "desc": MAP_DESC}
    return f"{join_entities(entities)}_{MAP_SUFFIX}.nii.gz"


def map_path(scan: BidsScan) -> str:
    """The map's path inside the derivatives dataset (forward slashes)."""
    return scan.relative.rsplit("/", 1)[0] + "/" + map_name(scan)


def scores_name(suffix: str) -> str:
    """The group table's file name for scans of `suffix`."""
    return f"desc-scores_{suffix}.tsv"


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def check_output_root(out: Path) -> None:
    """Refuse an OUTPUT_DIR that is a file or holds another pipeline's derivatives (its
    dataset_description.json is not volscan's): volscan never writes into what it did not make."""
    if out.exists() and not out.is_dir():
        raise InputFileError(out, "output path exists and is not a folder")
    description = out / DESCRIPTION_FILE
    if not description.exists():
        return
    try:
        data = json.loads(description.read_text(encoding="utf-8"))
        names = [g.get("Name") for g in data.get("GeneratedBy", [])]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        names = []
    if PIPELINE not in names:
        raise InputFileError(description, "this folder holds another dataset (its GeneratedBy does not name volscan); "
                                          "choose an empty or volscan output folder")


def write_description(out: Path, bids_root: Path) -> Path:
    """OUTPUT_DIR/dataset_description.json of a volscan derivatives dataset (written each time:
    the version and source are the latest run's)."""
    from volumetric.atomic_files import atomic_write_bytes

    check_output_root(out)
    source = json.loads((bids_root / DESCRIPTION_FILE).read_text(encoding="utf-8"))
    dataset = {"URL": bids_root.resolve().as_uri()}
    for key, field in (("DatasetDOI", "DOI"), ("Version", "Version")):
        if isinstance(source.get(key), str):
            dataset[field] = source[key]
    description = {
        "Name": f"volscan anomaly maps of {source.get('Name', bids_root.name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": PIPELINE, "Version": volscan_version(),
                         "Description": "training-free anomaly detection: mutual scoring and CoDeGraph"}],
        "SourceDatasets": [dataset],
        "DatasetLinks": {"raw": bids_root.resolve().as_uri()},
    }
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out / DESCRIPTION_FILE, _json_bytes(description))


def _copy(source: Path, target: Path) -> None:
    """Atomically copy the run's map `source` to its derivative name `target`."""
    from volumetric.atomic_files import atomic_path

    with atomic_path(target, suffix=".tmp.nii.gz") as tmp:
        shutil.copyfile(source, tmp)


def write_derivatives(out: Path, bids_root: Path, scans: Sequence[BidsScan], report: Any, run_dir: Path) -> list[Path]:
    """The derivative files of a finished screen run (`report`: its `pipelines.report.Report`,
    `run_dir`: its folder) over `scans`; returns the files written."""
    from volumetric.atomic_files import atomic_write_bytes

    by_id = {s.id: s for s in scans}
    written = [write_description(out, bids_root)]
    rows = []
    for entry in report.subjects:
        scan = by_id[entry.id]
        relative = map_path(scan)
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(run_dir / entry.map, target)
        source = f"bids:raw:{scan.relative}"
        sidecar = {
            "Description": "anomaly map on the source scan's grid: token scores of mutual scoring / CoDeGraph "
                           "upsampled to the scan, 0 outside its brain mask; higher = more unusual within the cohort",
            "Sources": [source],
            "SpatialReference": source,
            "Units": "arbitrary",
            "AnomalyScore": entry.score,
            "Rank": entry.rank,
            "Flagged": entry.flagged,
            "Hotspot": entry.hotspot,
        }
        written += [target, atomic_write_bytes(target.with_name(target.name[: -len(".nii.gz")] + ".json"),
                                               _json_bytes(sidecar))]
        session = scan.entity("ses")
        rows.append([f"sub-{scan.entity('sub')}", f"ses-{session}" if session else "n/a", scan.id, source,
                     f"{entry.score:.9g}", entry.rank, f"{entry.percentile:g}", str(entry.flagged).lower(), relative])
    suffix = scans[0].suffix
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(list(SCORE_COLUMNS))
    writer.writerows(rows)
    table = out / scores_name(suffix)
    written.append(atomic_write_bytes(table, buffer.getvalue().encode("utf-8")))
    written.append(atomic_write_bytes(table.with_suffix(".json"), _json_bytes(SCORE_COLUMNS)))
    ignore = out / ".bidsignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.is_file() else []
    if f"{RUN_FOLDER}/" not in lines:
        written.append(atomic_write_bytes(ignore, ("\n".join(lines + [f"{RUN_FOLDER}/"]) + "\n").encode("utf-8")))
    return written


def check_derivative_names(root: str | Path) -> list[str]:
    """Problems of a derivatives dataset under the rules of the module docstring (empty when it
    passes): dataset_description.json with DatasetType "derivative" and GeneratedBy names;
    every file under `sub-*` in `sub-X/[ses-Y/]anat/`, its name `parse_name`-valid with
    derivative entities, sub/ses equal to its folders, not a permissible raw name (a `space` or
    `desc` entity), each NIfTI with its JSON sidecar; every root table with its sidecar."""
    root = Path(root)
    problems = []
    try:
        description = json.loads((root / DESCRIPTION_FILE).read_text(encoding="utf-8"))
        if description.get("DatasetType") != "derivative":
            problems.append(f"{DESCRIPTION_FILE}: DatasetType is not 'derivative'")
        if not all(isinstance(g, dict) and g.get("Name") for g in description.get("GeneratedBy") or [None]):
            problems.append(f"{DESCRIPTION_FILE}: GeneratedBy must list objects with a Name")
        if not isinstance(description.get("BIDSVersion"), str):
            problems.append(f"{DESCRIPTION_FILE}: BIDSVersion missing")
    except (OSError, ValueError) as exc:
        problems.append(f"{DESCRIPTION_FILE}: missing or not JSON ({exc})")
    for table in root.glob("*.tsv"):
        if not table.with_suffix(".json").is_file():
            problems.append(f"{table.name}: no JSON sidecar")
    for path in sorted(p for p in root.glob("sub-*/**/*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        folders = relative.split("/")[:-1]
        try:
            entities, _, extension = parse_name(path, DERIVATIVE_ENTITIES)
        except InputFileError as exc:
            problems.append(f"{relative}: {str(exc).split(': ', 1)[-1]}")
            continue
        expected = [f"sub-{entities['sub']}"] + ([f"ses-{entities['ses']}"] if "ses" in entities else []) + [DATATYPE]
        if folders != expected:
            problems.append(f"{relative}: expected in {'/'.join(expected)}/")
        if not {"space", "desc"} & set(entities):
            problems.append(f"{relative}: a permissible raw name (no space or desc entity)")
        if not all(LABEL.fullmatch(v) for k, v in entities.items() if k in ENTITY_ORDER):
            problems.append(f"{relative}: entity values must be alphanumeric")
        if extension in (".nii.gz", ".nii") and not path.with_name(path.name[: -len(extension)] + ".json").is_file():
            problems.append(f"{relative}: no JSON sidecar")
    return problems
