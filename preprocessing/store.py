"""The cohort store's files and their records: where each subject's outputs live, with checksums.

Layout of an output folder (see docs/preprocessing.md): `images/<id>.nii.gz` (standardised
cube), `masks/<id>.nii.gz`, `mappings/<id>.json`, `transforms/<id>.tfm`, `spatial/<id>.nii.gz`
(cube before Nyúl), `records/<id>.json`, `landmarks.npy` (+ `.json`), `volscan-store.json`.

`records/<id>.json` holds the subject id it was written for, the cache keys (input content hash +
settings), the settings themselves, the brain-mask extractor used, and the SHA-256 of every file
the subject owns (by its path in the store); the record carries a checksum of itself. So every
stored file is bound to its key through its record: a file whose checksum no longer matches (bit
flip, truncation, hand edit, another subject's file copied or moved onto its name) makes
`verified_files` return False with a warning naming the file, a record moved onto another
subject's name is refused by `read_record` with a warning naming it, and the caller rebuilds the
subject: a damaged cache costs one recomputation, never a persistent error or a silently wrong
cube. Readers that must not write (`volscan score`) pass `rebuild=False`: the warning then does
not promise a rebuild, and the caller reports the subject instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.io import load_volume
from preprocessing.native_mapping import NativeMapping
from volumetric.atomic_files import atomic_write_bytes, tidy_before_writing
from volumetric.hashing import digest, file_sha256

log = logging.getLogger(__name__)

RECORD_FORMAT = "volscan-preprocess-record/2"
# In every store volscan writes into: marks it as volscan's; in a cache, its time is the last use.
STORE_MARKER = "volscan-store.json"
STORE_FORMAT = "volscan-store/1"


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


def store_folders(out: Path) -> list[Path]:
    """The folders of the store at `out` that volscan writes files into (`out` itself first)."""
    layout = subject_record(out, "_", out)
    return sorted({out, out / "records", *(p.parent for p in (layout.image_path, *layout.spatial_files))})


def open_for_writing(out: Path) -> None:
    """Call before writing into the store at `out`: removes from its folders the temporaries
    that killed volscan runs of this host left (`volumetric.atomic_files`; once per process)."""
    for folder in store_folders(out):
        tidy_before_writing(folder)


def mark_used(out: Path) -> None:
    """Set the time of the cache store `out`'s `STORE_MARKER` to now: its last use, which
    `volscan cache prune --older-than` goes by (runs that use a cache call this; a resumed
    `volscan preprocess` output is left untouched)."""
    try:
        os.utime(out / STORE_MARKER)
    except OSError:
        log.debug("could not touch %s", out / STORE_MARKER, exc_info=True)


def is_store_marker(path: Path) -> bool:
    """Whether `path` is a store's `STORE_MARKER` as volscan writes it."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) == {"format": STORE_FORMAT}
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def is_record(path: Path) -> bool:
    """Whether `path` parses as a subject record volscan wrote (any format version; not verified)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and str(record.get("format", "")).startswith("volscan-preprocess-record/")


def read_record(out: Path, sid: str, *, rebuild: bool = True) -> dict[str, Any]:
    """The stored record of `sid` ({} when absent; {"corrupt": True} with a warning naming it when
    damaged or written for another subject; `rebuild`: the warning says the subject is rebuilt)."""
    path = out / "records" / f"{sid}.json"
    then = "; rebuilding that subject" if rebuild else ""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is unreadable%s", path, then)
        return {"corrupt": True}
    if isinstance(record, dict) and record.get("format") != RECORD_FORMAT and "checksum" not in record:
        log.info("%s was written by an older volscan%s", path, then)
        return {}
    if not isinstance(record, dict) or record.pop("checksum", None) != _checksum(record):
        log.warning("%s was changed after volscan wrote it (checksum mismatch)%s", path, then)
        return {"corrupt": True}
    if record.get("id", sid) != sid:
        log.warning("%s was written for subject %r, not %r%s", path, record["id"], sid, then)
        return {"corrupt": True}
    return record


def write_record(out: Path, sid: str, record: dict[str, Any]) -> None:
    """Write `record` for subject `sid` (with its id and its own checksum) atomically; the
    store's `STORE_MARKER` comes with its first record (a run that wrote nothing leaves none)."""
    if not (out / STORE_MARKER).is_file():
        atomic_write_bytes(out / STORE_MARKER, json.dumps({"format": STORE_FORMAT}).encode())
    body = {**record, "id": sid, "format": RECORD_FORMAT}
    body["checksum"] = _checksum(body)
    atomic_write_bytes(out / "records" / f"{sid}.json", json.dumps(body, indent=1).encode())


def file_checksums(out: Path, paths: tuple[Path, ...]) -> dict[str, str]:
    """{path relative to `out`: SHA-256} of `paths` (just written)."""
    return {str(p.relative_to(out)): file_sha256(p) for p in paths}


def verified_files(out: Path, paths: tuple[Path, ...], checksums: dict[str, str] | None, *,
                   rebuild: bool = True) -> bool:
    """True when every path exists and matches its recorded checksum; False (warning naming the
    first damaged file; `rebuild`: saying it is rebuilt) otherwise. Absent files or no checksums:
    False, silently (never built)."""
    if not checksums or not all(p.exists() for p in paths):
        return False
    for path in paths:
        expected = checksums.get(str(path.relative_to(out)))
        if expected is None or file_sha256(path) != expected:
            log.warning("%s: cached file is corrupt or was changed (checksum mismatch)%s", path,
                        "; rebuilding it" if rebuild else "")
            return False
    return True


def _checksum(record: dict[str, Any]) -> str:
    return digest(record, 64)
