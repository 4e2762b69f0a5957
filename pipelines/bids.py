"""Reading a BIDS dataset's anatomical scans: `volscan screen BIDS_ROOT`, `volscan bids`.

A folder is a BIDS dataset root when it holds `dataset_description.json` (BIDS common
principles). Its scans are `sub-<label>/[ses-<label>/]anat/<entities>_<suffix>.nii[.gz]`, one
suffix per screen (`--bids-suffix`: T1w, T2w or FLAIR; mutual scoring compares scans of one
contrast). A file name is read by the spec's entity rules (appendix "Entities"; the anat
"nonparametric structural" template `sub-<label>[_ses-<label>][_task-<label>][_acq-<label>]
[_ce-<label>][_rec-<label>][_run-<index>][_echo-<index>][_part-<label>][_chunk-<index>]
_<suffix>.nii[.gz]`):

- key-value pairs joined by `_`, each `<key>-<value>`, keys in the spec's entity order, each
  at most once; labels alphanumeric (`[0-9a-zA-Z]+`), indices (run, echo, chunk) digits;
- `sub` (and `ses` inside a session folder) first, equal to the folders holding the file.

The scan id is the name without its suffix and extension (`sub-01_ses-02_run-1`): unique in a
valid dataset and carrying every entity. A name breaking these rules, a `--participant-label`
that is not a label or names no participant, two files with one id (`.nii` beside `.nii.gz`)
and a dataset with no matching scan are each refused with one line naming the file or folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.choices import BIDS_SUFFIXES
from pipelines.subjects import Subject, discover_subjects, match_labels, validate_subjects
from volumetric.errors import InputFileError, VolscanError

DESCRIPTION_FILE = "dataset_description.json"
DATATYPE = "anat"
# The spec's entity order (appendix "Entity table"), the entities volscan reads or writes.
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "part", "space", "chunk", "desc")
# Entities of a raw anatomical (non-parametric) file; derivatives add `space` and `desc`.
ANAT_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "part", "chunk")
INDEX_ENTITIES = ("run", "echo", "chunk")
LABEL = re.compile(r"[0-9a-zA-Z]+")
INDEX = re.compile(r"[0-9]+")
EXTENSIONS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class BidsSelection:
    """Which scans of a BIDS dataset to screen: one `suffix`, and the `participants` (labels
    without `sub-`; empty = every participant)."""

    suffix: str = "T1w"
    participants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.suffix not in BIDS_SUFFIXES:
            raise VolscanError(f"--bids-suffix must be one of {', '.join(BIDS_SUFFIXES)}, got {self.suffix!r}")
        labels = tuple(dict.fromkeys(p[4:] if p.startswith("sub-") else p for p in self.participants))
        for label in labels:
            if not LABEL.fullmatch(label):
                raise VolscanError(f"--participant-label {label!r} is not a BIDS label (letters and digits only, "
                                   "with or without 'sub-')")
        object.__setattr__(self, "participants", labels)


@dataclass(frozen=True)
class BidsScan:
    """One scan: its file, its entities in spec order ({key: value}) and suffix."""

    path: Path
    entities: tuple[tuple[str, str], ...]
    suffix: str

    @property
    def id(self) -> str:
        """The scan id: the entities as in the file name (`sub-01_ses-02_run-1`)."""
        return join_entities(dict(self.entities))

    @property
    def relative(self) -> str:
        """Path inside the dataset, forward slashes (for BIDS URIs `bids:raw:<relative>`)."""
        folders = [f"sub-{self.entity('sub')}"] + ([f"ses-{self.entity('ses')}"] if self.entity("ses") else [])
        return "/".join(folders + [DATATYPE, self.path.name])

    def entity(self, key: str) -> str | None:
        """The value of entity `key`, or None."""
        return dict(self.entities).get(key)


def is_bids_root(folder: str | Path) -> bool:
    """Whether `folder` is a BIDS dataset root (it holds dataset_description.json)."""
    return (Path(folder) / DESCRIPTION_FILE).is_file()


def bids_protected(root: str | Path) -> tuple[Path, ...]:
    """What an output must not overlap in a BIDS dataset: the dataset root itself (as a target)
    and every participant folder; `<root>/derivatives/<pipeline>` stays allowed."""
    root = Path(root)
    return (root / DESCRIPTION_FILE,) + tuple(sorted(p for p in root.glob("sub-*")))


def join_entities(entities: dict[str, str]) -> str:
    """`{sub: 01, run: 1}` -> `sub-01_run-1`, in the spec's entity order."""
    return "_".join(f"{key}-{entities[key]}" for key in ENTITY_ORDER if key in entities)


def parse_name(path: Path, allowed: Sequence[str] = ANAT_ENTITIES) -> tuple[dict[str, str], str, str]:
    """(entities, suffix, extension) of a BIDS file name, by the rules in the module docstring;
    a name breaking them is an `InputFileError` naming the file."""
    name = path.name
    extension = next((e for e in EXTENSIONS + (".json", ".tsv") if name.endswith(e)), None)
    if extension is None:
        raise InputFileError(path, "not a BIDS file name: extension is not .nii, .nii.gz, .json or .tsv")
    parts = name[: -len(extension)].split("_")
    suffix = parts.pop()
    if not LABEL.fullmatch(suffix):
        raise InputFileError(path, f"not a BIDS file name: suffix {suffix!r} is not alphanumeric")
    entities: dict[str, str] = {}
    for part in parts:
        key, dash, value = part.partition("-")
        if not dash or not key:
            raise InputFileError(path, f"not a BIDS file name: {part!r} is not an entity <key>-<value>")
        if key not in allowed:
            raise InputFileError(path, f"not a BIDS file name: entity {key!r} is not allowed here "
                                       f"(allowed: {', '.join(allowed)})")
        if key in entities:
            raise InputFileError(path, f"not a BIDS file name: entity {key!r} appears twice")
        if entities and ENTITY_ORDER.index(key) < ENTITY_ORDER.index(list(entities)[-1]):
            raise InputFileError(path, f"not a BIDS file name: entity {key!r} comes after {list(entities)[-1]!r} "
                                       f"(order: {', '.join(k for k in ENTITY_ORDER if k in allowed)})")
        pattern = INDEX if key in INDEX_ENTITIES else LABEL
        if not pattern.fullmatch(value):
            what = "an index (digits)" if key in INDEX_ENTITIES else "a label (letters and digits)"
            raise InputFileError(path, f"not a BIDS file name: {key}-{value!r} must be {what}")
        entities[key] = value
    if list(entities)[:1] != ["sub"]:
        raise InputFileError(path, "not a BIDS file name: it must start with sub-<label>")
    return entities, suffix, extension


def _read_description(root: Path) -> dict:
    path = root / DESCRIPTION_FILE
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(path, f"not a readable JSON file ({exc})") from None
    if not isinstance(description, dict):
        raise InputFileError(path, "must hold a JSON object")
    return description


def _anat_folders(root: Path, participants: Iterable[str]) -> list[tuple[Path, str, str | None]]:
    """(anat folder, subject label, session label or None) of the chosen participants."""
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    known = {p.name[4:] for p in subjects}
    for label in participants:
        if label not in known:
            shown = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
            raise InputFileError(root, f"--participant-label {label!r}: no folder sub-{label} "
                                       f"(participants: {shown or 'none'})")
    chosen = set(participants) or known
    folders = []
    for subject in subjects:
        label = subject.name[4:]
        if label not in chosen:
            continue
        if not LABEL.fullmatch(label):
            raise InputFileError(subject, f"not a BIDS subject folder: label {label!r} is not alphanumeric")
        folders.append((subject / DATATYPE, label, None))
        for session in sorted(p for p in subject.glob("ses-*") if p.is_dir()):
            if not LABEL.fullmatch(session.name[4:]):
                raise InputFileError(session, f"not a BIDS session folder: label {session.name[4:]!r} is not "
                                              "alphanumeric")
            folders.append((session / DATATYPE, label, session.name[4:]))
    return folders


def find_scans(root: str | Path, selection: BidsSelection) -> list[BidsScan]:
    """The scans of `selection` in the BIDS dataset `root`, sorted by id (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(root, "BIDS dataset folder does not exist")
    if not is_bids_root(root):
        raise InputFileError(root, f"not a BIDS dataset root (no {DESCRIPTION_FILE}); --bids-suffix and "
                                   "--participant-label need one")
    _read_description(root)
    scans: dict[str, BidsScan] = {}
    for folder, subject, session in _anat_folders(root, selection.participants):
        endings = tuple(f"_{selection.suffix}{e}" for e in EXTENSIONS)
        candidates = sorted(folder.glob(f"*_{selection.suffix}.nii*")) if folder.is_dir() else []
        for path in (p for p in candidates if p.is_file() and p.name.endswith(endings)):
            entities, suffix, _ = parse_name(path)
            if entities["sub"] != subject or entities.get("ses") != session:
                where = f"sub-{subject}" + (f"/ses-{session}" if session else "")
                raise InputFileError(path, f"its sub/ses entities do not match its folder {where}")
            scan = BidsScan(path, tuple((k, entities[k]) for k in ENTITY_ORDER if k in entities), suffix)
            if scan.id in scans:
                raise InputFileError(path, f"two files map to the scan id '{scan.id}' ({scans[scan.id].path.name} "
                                           f"and {path.name}); keep one")
            scans[scan.id] = scan
    if not scans:
        which = f" of participant(s) {', '.join(selection.participants)}" if selection.participants else ""
        raise InputFileError(root, f"BIDS dataset holds no sub-*/[ses-*/]anat/*_{selection.suffix}.nii[.gz] "
                                   f"scan{which}")
    return [scans[i] for i in sorted(scans)]


def bids_subjects(
    root: str | Path, selection: BidsSelection, labels_dir: str | Path | None = None, *, registered: bool = False,
    skull_stripped: bool = False, minimum: int = 2,
) -> list[Subject]:
    """`pipelines.subjects.Subject`s of `find_scans` (id = entities), masks matched by id from
    `labels_dir` (`sub-01_ses-02_run-1.nii.gz`), every header checked (`validate_subjects`)."""
    scans = find_scans(root, selection)
    labels = match_labels(labels_dir, [s.id for s in scans], "3d") if labels_dir is not None else {}
    subjects = [Subject(id=s.id, image=s.path, label=labels.get(s.id), registered=registered,
                        skull_stripped=skull_stripped) for s in scans]
    validate_subjects(subjects, minimum)
    return subjects


def cohort_subjects(
    input_dir: str | Path, bids: BidsSelection | None, labels_dir: str | Path | None, *, registered: bool,
    skull_stripped: bool, minimum: int = 2,
) -> list[Subject]:
    """The subjects of an input: a BIDS dataset root (or any input when `bids` is given) by
    `bids_subjects`, a plain folder by `pipelines.subjects.discover_subjects`."""
    if bids is not None or is_bids_root(input_dir):
        return bids_subjects(input_dir, bids or BidsSelection(), labels_dir, registered=registered,
                             skull_stripped=skull_stripped, minimum=minimum)
    return discover_subjects(input_dir, labels_dir, registered=registered, skull_stripped=skull_stripped,
                             minimum=minimum)[0]
