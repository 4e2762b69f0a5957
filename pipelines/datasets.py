"""Finding and choosing scans of the public datasets the reproduction uses (IXI, BraTS-METS 2025).

Both are read in their own distributed layout and naming:
- IXI T2 (healthy): flat files `IXI<nnn>-<Site>-<nnnn>-T2.nii.gz`, e.g. `IXI002-Guys-0828-T2.nii.gz`
  (sites Guys, HH, IOP), anywhere under the given folder. Raw scanner space with skull: the
  screen registers them to SRI-24 and brain-masks them.
- BraTS-METS 2025 (metastases): one folder per case, `BraTS-MET-<patient>-<timepoint>/` holding
  `<case>-t2w.nii.gz` and `<case>-seg.nii.gz` (plus t1n/t1c/t2f), anywhere under the given
  folder. Already in SRI-24 space and skull-stripped; used as distributed.

"Pre-treatment" rule (our reading, overridable): the BraTS case id ends in a timepoint index
(`-000`, `-001`, ...) and the first scan of a patient, timepoint `000`, is the pre-treatment
scan, as in BraTS-METS 2023 ("pre-treatment MRI"), whose cases all end in `-000`; later
timepoints are follow-ups. Pass `timepoints=` (a regular expression on the 3-digit index) or an
explicit `case_list` file (one case id per line, e.g. from the challenge's metadata sheet)
when the release you have marks treatment status differently. Cases without a `-seg` file
(validation/test releases) cannot be scored and are left out with a warning.

Selection is a seeded draw without replacement from the sorted candidates, so it depends only
on the seed and the set of files, not on the file system's listing order.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

IXI_T2 = re.compile(r"^(IXI(\d{3})-([A-Za-z]+)-(\d{4}))-T2\.nii(\.gz)?$")
BRATS_CASE = re.compile(r"^BraTS-MET-(\d{5})-(\d{3})$")
PRE_TREATMENT_TIMEPOINTS = r"000"


@dataclass(frozen=True)
class DatasetScan:
    """One chosen scan: `id`, `image`, `label` (None = healthy), `dataset`, and whether it is
    already in template space (`registered`) and brain-only (`skull_stripped`)."""

    id: str
    image: Path
    label: Path | None
    dataset: str
    registered: bool
    skull_stripped: bool

    def to_dict(self) -> dict:
        """JSON-ready dict (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def find_ixi_t2(root: str | Path) -> list[DatasetScan]:
    """All IXI T2 scans under `root`, sorted by id (raw: not registered, not skull-stripped)."""
    root = _existing_folder(root, "IXI")
    scans = {}
    for path in sorted(root.rglob("IXI*-T2.nii*")):
        match = IXI_T2.match(path.name)
        if match and path.is_file():
            scans.setdefault(match.group(1) + "-T2", path)
    return [DatasetScan(sid, path, None, "IXI", False, False) for sid, path in sorted(scans.items())]


def find_brats_mets(root: str | Path, timepoints: str = PRE_TREATMENT_TIMEPOINTS,
                    case_list: str | Path | None = None) -> list[DatasetScan]:
    """BraTS-METS T2 cases under `root` that count as pre-treatment, sorted by case id.

    `timepoints`: regular expression the 3-digit timepoint must match in full (default "000").
    `case_list`: file of case ids; when given it replaces the timepoint rule.
    """
    root = _existing_folder(root, "BraTS")
    wanted = _read_case_list(case_list) if case_list is not None else None
    try:
        timepoint_rule = re.compile(timepoints)
    except re.error as exc:
        raise VolscanError(f"--brats-timepoints {timepoints!r} is not a valid regular expression ({exc})") from None
    scans, unlabelled = [], []
    for image in sorted(root.rglob("BraTS-MET-*-t2w.nii*")):
        case = image.parent.name
        match = BRATS_CASE.match(case)
        if not match or not image.name.startswith(case + "-"):
            continue
        if wanted is not None:
            if case not in wanted:
                continue
        elif not timepoint_rule.fullmatch(match.group(2)):
            continue
        seg = next((p for p in sorted(image.parent.glob(f"{case}-seg.nii*")) if p.is_file()), None)
        if seg is None:
            unlabelled.append(case)
            continue
        scans.append(DatasetScan(case, image, seg, "BraTS-METS", True, True))
    if unlabelled:
        log.warning("%s: %d BraTS case(s) have no -seg file and are left out (e.g. %s)", root, len(unlabelled),
                    unlabelled[0])
    if wanted is not None:
        missing = sorted(wanted - {s.id for s in scans})
        if missing:
            raise InputFileError(case_list, f"{len(missing)} listed case(s) have no t2w + seg files under {root} "
                                            f"(e.g. {missing[0]})")
    return scans


def choose(scans: list[DatasetScan], count: int, seed: int, what: str) -> list[DatasetScan]:
    """A seeded choice of `count` scans without replacement, returned sorted by id."""
    if count < 1:
        raise VolscanError(f"the number of {what} scans must be at least 1, got {count}")
    if len(scans) < count:
        raise VolscanError(f"{what}: found {len(scans)} usable scan(s), need {count}; point at the dataset's "
                           f"root folder or lower the count")
    ordered = sorted(scans, key=lambda s: s.id)
    picked = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return sorted((ordered[i] for i in picked), key=lambda s: s.id)


def _existing_folder(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(root, f"{what} folder does not exist or is not a folder")
    return root


def _read_case_list(path: str | Path) -> set[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").split()
    except OSError as exc:
        raise InputFileError(path, f"cannot read the case list ({exc.strerror})") from None
    cases = {line.strip() for line in lines if line.strip()}
    bad = sorted(c for c in cases if not BRATS_CASE.match(c))
    if bad:
        raise InputFileError(path, f"not a BraTS-METS case id: {bad[0]!r} (expected BraTS-MET-<5 digits>-<3 digits>)")
    if not cases:
        raise InputFileError(path, "the case list is empty")
    return cases


def write_selection(scans: list[DatasetScan], path: Path, seed: int) -> None:
    """Record the chosen scans (ids, paths, flags) as JSON, atomically."""
    from volumetric.atomic_files import atomic_write_bytes

    payload = {"seed": seed, "scans": [s.to_dict() for s in scans]}
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())
