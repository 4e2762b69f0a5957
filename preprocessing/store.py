"""The cohort store's files and their records: where each subject's outputs live, with checksums.

Layout of an output folder (see docs/preprocessing.md): `images/<id>.nii.gz` (standardised
cube), `masks/<id>.nii.gz`, `mappings/<id>.json`, `transforms/<id>.tfm`, `spatial/<id>.nii.gz`
(cube before Nyúl), `records/<id>.json`, `landmarks.npy` (+ `.json`).

`records/<id>.json` holds the cache keys (input content hash + settings), the settings
themselves, the brain-mask extractor used, and the SHA-256 of every file the subject owns; the
record carries a checksum of itself. A file whose checksum no longer matches (bit flip,
truncation, hand edit) makes `verified_files` return False with a warning naming the file, and
the caller rebuilds it: a damaged cache costs one recomputation, never a persistent error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.io import load_volume
from preprocessing.native_mapping import NativeMapping
from volumetric.atomic_files import atomic_write_bytes, tidy_before_writing
from volumetric.backbones import file_sha256
from volumetric.errors import InputFileError

log = logging.getLogger(__name__)

RECORD_FORMAT = "volscan-preprocess-record/2"


@dataclass(frozen=True)
class SubjectRecord:
    """Where one subject's outputs are: cube `image_path`, `mask_path`, `mapping_path`, ITK
    `transform_path`, `spatial_path` (cube before Nyúl); `brain_mask`: the extractor used
    ("hd-bet", "deepbet", "template", "nonzero"); `warnings`: what the report must show."""

    id: str
    source: Path
    image_path: Path
    mask_path: Path
    mapping_path: Path
    transform_path: Path
    spatial_path: Path
    brain_mask: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def spatial_files(self) -> tuple[Path, ...]:
        """Outputs of the spatial chain (checksummed together)."""
        return (self.spatial_path, self.mask_path, self.mapping_path, self.transform_path)

    def load_image(self) -> np.ndarray:
        """Standardised cube (S, S, S) float32 (0 outside the brain)."""
        return load_volume(self.image_path).array

    def load_mask(self) -> np.ndarray:
        """Brain mask (S, S, S) bool."""
        return load_volume(self.mask_path).array > 0

    def load_mapping(self) -> NativeMapping:
        """The subject's `NativeMapping` (cube ↔ input grid)."""
        return NativeMapping.load(self.mapping_path)


def subject_record(out: Path, sid: str, source: Path, brain_mask: str = "", warnings: tuple[str, ...] = ()) -> SubjectRecord:
    """The record of subject `sid` in the store at `out` (paths only; nothing is read)."""
    return SubjectRecord(
        id=sid,
        source=source,
        image_path=out / "images" / f"{sid}.nii.gz",
        mask_path=out / "masks" / f"{sid}.nii.gz",
        mapping_path=out / "mappings" / f"{sid}.json",
        transform_path=out / "transforms" / f"{sid}.tfm",
        spatial_path=out / "spatial" / f"{sid}.nii.gz",
        brain_mask=brain_mask,
        warnings=warnings,
    )


def open_for_writing(out: Path) -> None:
    """Call before writing into the store at `out`: removes from its folders the temporaries
    that killed volscan runs of this host left (`volumetric.atomic_files`; once per process)."""
    layout = subject_record(out, "_", out)
    for folder in sorted({out, out / "records", *(p.parent for p in (layout.image_path, *layout.spatial_files))}):
        tidy_before_writing(folder)


def read_record(out: Path, sid: str) -> dict[str, Any]:
    """The stored record of `sid` ({} when absent; {"corrupt": True} with a warning when damaged)."""
    path = out / "records" / f"{sid}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is unreadable; rebuilding that subject", path)
        return {"corrupt": True}
    if isinstance(record, dict) and record.get("format") != RECORD_FORMAT and "checksum" not in record:
        log.info("%s was written by an older volscan; rebuilding that subject", path)
        return {}
    if not isinstance(record, dict) or record.pop("checksum", None) != _checksum(record):
        log.warning("%s was changed after volscan wrote it (checksum mismatch); rebuilding that subject", path)
        return {"corrupt": True}
    return record


def write_record(out: Path, sid: str, record: dict[str, Any]) -> None:
    """Write `record` (with its own checksum) atomically."""
    body = {**record, "format": RECORD_FORMAT}
    body["checksum"] = _checksum(body)
    atomic_write_bytes(out / "records" / f"{sid}.json", json.dumps(body, indent=1).encode())


def file_checksums(out: Path, paths: tuple[Path, ...]) -> dict[str, str]:
    """{path relative to `out`: SHA-256} of `paths` (just written)."""
    return {str(p.relative_to(out)): file_sha256(p) for p in paths}


def verified_files(out: Path, paths: tuple[Path, ...], checksums: dict[str, str] | None,
                   then: str = "rebuilding it") -> bool:
    """True when every path exists and matches its recorded checksum; False (warning naming the
    first damaged file and what the caller does `then`) otherwise. Absent files or no
    checksums: False, silently (never built)."""
    if not checksums or not all(p.exists() for p in paths):
        return False
    for path in paths:
        expected = checksums.get(str(path.relative_to(out)))
        if expected is None or file_sha256(path) != expected:
            log.warning("%s: cached file is corrupt or was changed (checksum mismatch); %s", path, then)
            return False
    return True


def content_hash(path: Path) -> str:
    """SHA-256 of an input file, or of every file of a DICOM series folder (sorted by name)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise InputFileError(path, "no such file or folder")
    if not path.is_dir():
        return file_sha256(path)
    for file in files:
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def digest(obj: object) -> str:
    """Short key of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _checksum(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
