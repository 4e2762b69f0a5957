"""What volscan keeps in a cache folder, how big it is, and pruning it (`volscan cache du|prune`).

A cache folder (`--cache`, default `$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`) holds
(locations and keys: `volumetric.cache_keys`):

- `preprocess/<cohort digest>/`: one preprocessing store per cohort (`preprocessing.store`),
  marked by its `volscan-store.json` and its subject records;
- `tokens/<key[:2]>/<key>.safetensors`: one token set per scan and setting (`volumetric.token_cache`);
- `extract/<cohort digest>/errors-*.jsonl`: `volscan extract`'s error logs;
- `templates/`, `hd-bet/`: downloads (`volscan template fetch`, HD-BET weights), counted but
  never pruned: they are inputs, not results.

An entry counts as volscan's only when its place, its name and its content say so (a store's
marker or records parse as volscan's, a token file's header carries volscan's format and
checksum); pruning removes exactly those files (a store's: the files its records name, its
landmarks and marker), the temporaries of killed runs under the rules of
`volumetric.atomic_files.remove_stale_temporaries`, and folders left empty. Anything else in
the cache folder is counted as "other" and left alone.

An entry's last use is its modification time: `screen` and `extract` touch a store's marker
on every run (`preprocessing.store.mark_used`) and a token file on every cache hit;
`volscan score`, which writes nothing, does not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from volumetric.atomic_files import is_temporary, remove_stale_temporaries
from volumetric.cache_keys import extract_logs_root, preprocess_root, tokens_root
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

DOWNLOADS = ("templates", "hd-bet")
_TOKEN_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")
_LOG_NAME = re.compile(r"errors-[A-Za-z0-9-]+\.jsonl")
# A safetensors header is a little-endian u64 length then that much JSON; volscan's are small.
_MAX_HEADER = 1 << 20


@dataclass
class Entry:
    """One prunable unit: a cohort store ("store", `scans` subjects), a token set ("tokens") or
    an error log ("log"); its `files`, their `bytes` and the time of its `last_use` (epoch s)."""

    kind: str
    path: Path
    files: list[Path]
    bytes: int
    last_use: float
    scans: int = 0


@dataclass
class CacheContents:
    """Everything under `root`: volscan's prunable `entries`, `downloads` (bytes, never pruned),
    `temporaries` (files of interrupted writes) and `other` files volscan did not write."""

    root: Path
    entries: list[Entry] = field(default_factory=list)
    downloads: int = 0
    temporaries: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)

    def bytes_of(self, kind: str) -> int:
        """Bytes of the entries of `kind`."""
        return sum(e.bytes for e in self.entries if e.kind == kind)

    @property
    def total(self) -> int:
        """Bytes of every file under the root."""
        return (sum(e.bytes for e in self.entries) + self.downloads
                + sum(_size(p) for p in (*self.temporaries, *self.other)))


def human_bytes(count: float) -> str:
    """`count` bytes as e.g. "58.2 MB" (powers of 1000, as `du --si`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def scan_cache(root: str | os.PathLike[str]) -> CacheContents:
    """Sort every file under `root` into volscan's entries, downloads, temporaries and other files."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VolscanError(f"{root}: no such cache folder")
    contents = CacheContents(root)
    claimed: set[Path] = set()
    for folder in sorted(preprocess_root(root).glob("*/")):
        entry = _store_entry(folder)
        if entry is not None:
            contents.entries.append(entry)
            claimed.update(entry.files)
    for path in sorted(tokens_root(root).glob("??/*.safetensors")):
        if _TOKEN_NAME.fullmatch(path.name) and path.parent.name == path.name[:2] and _is_token_file(path):
            contents.entries.append(_file_entry("tokens", path))
            claimed.add(path)
    for path in sorted(extract_logs_root(root).glob("*/errors-*.jsonl")):
        if _LOG_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            contents.entries.append(_file_entry("log", path))
            claimed.add(path)
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path in claimed:
                continue
            if Path(dirpath).relative_to(root).parts[:1] in ((d,) for d in DOWNLOADS):
                contents.downloads += _size(path)
            elif is_temporary(name):
                contents.temporaries.append(path)
            else:
                contents.other.append(path)
    return contents


def select(contents: CacheContents, older_than_s: float | None) -> list[Entry]:
    """The entries to prune: all of them (`older_than_s` None) or those last used at least
    `older_than_s` seconds ago."""
    if older_than_s is None:
        return list(contents.entries)
    now = time.time()
    return [e for e in contents.entries if now - e.last_use >= older_than_s]


def remove(contents: CacheContents, entries: list[Entry]) -> int:
    """Delete the files of `entries`, the stale temporaries of killed runs (this host's, their
    process gone, unlocked, over an hour old) and the folders this leaves empty; returns the
    bytes freed (temporaries not counted)."""
    freed = 0
    for entry in entries:
        for path in entry.files:
            size = _size(path)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
    folders = {p.parent for p in contents.temporaries} | {p.parent for e in entries for p in e.files}
    for folder in sorted(folders):
        remove_stale_temporaries(folder)
    _remove_empty_folders(contents.root, folders)
    return freed


def run_usage(root: Path, store: Path | None, token_files: list[Path]) -> dict[str, object]:
    """What a run's report says about the cache: its `root`, `total_bytes` (every file under
    it), and `run_bytes`: the run's own entries (its cohort's store, its token files), whose
    share per scan `usage_line` prints."""
    run_bytes = (folder_bytes(store) if store is not None else 0) + sum(_size(p) for p in token_files)
    return {"root": str(root), "total_bytes": folder_bytes(root), "run_bytes": run_bytes, "scans": len(token_files)}


def usage_line(usage: dict[str, object]) -> str:
    """One line for the end of a run from `run_usage`'s dictionary."""
    scans = int(usage.get("scans") or 0)
    run_bytes = int(usage["run_bytes"])
    per_scan = f", {human_bytes(run_bytes / scans)} per scan" if scans else ""
    return (f"cache: {usage['root']} holds {human_bytes(int(usage['total_bytes']))} (this run: "
            f"{human_bytes(run_bytes)}{per_scan}); volscan cache du / prune")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (symbolic links not followed; 0 when missing)."""
    return sum(_size(Path(dirpath) / name) for dirpath, _, names in os.walk(folder) for name in names)


def _store_entry(folder: Path) -> Entry | None:
    """The store at `folder` as one entry (the files volscan wrote there), or None when nothing
    there is recognisably volscan's."""
    from preprocessing.store import STORE_MARKER, is_record, is_store_marker, subject_record

    records = [p for p in sorted((folder / "records").glob("*.json")) if is_record(p)]
    marker = folder / STORE_MARKER
    if not records and not is_store_marker(marker):
        return None
    files = [marker] if marker.is_file() else []
    for record in records:
        layout = subject_record(folder, record.stem, folder)
        files += [record, *(p for p in (layout.image_path, *layout.spatial_files) if p.is_file())]
    landmarks = folder / "landmarks.json"
    if landmarks.is_file() and _has_digest(landmarks):
        files += [p for p in (landmarks, folder / "landmarks.npy") if p.is_file()]
    files = [p for p in files if not p.is_symlink()]
    last_use = marker.stat().st_mtime if marker.is_file() else max((p.stat().st_mtime for p in files), default=0.0)
    return Entry("store", folder, files, sum(_size(p) for p in files), last_use, scans=len(records))


def _file_entry(kind: str, path: Path) -> Entry:
    info = path.stat()
    return Entry(kind, path, [path], info.st_size, info.st_mtime)


def _is_token_file(path: Path) -> bool:
    """Whether `path`'s safetensors header carries volscan's token metadata (format, checksum)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER:
                return False
            header = json.loads(handle.read(length))
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and "format_version" in meta and "sha256" in meta


def _has_digest(path: Path) -> bool:
    """Whether a landmarks sidecar parses as volscan's (a JSON object with a digest)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(info, dict) and "digest" in info


def _remove_empty_folders(root: Path, folders: set[Path]) -> None:
    """Remove each of `folders` and its parents up to (not including) `root` while empty."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (someone's file, a live temporary) or already gone
                break
            folder = folder.parent


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
