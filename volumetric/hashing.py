"""Content hashes every cache key and checksum is made of (torch-free; the lowest layer).

`file_sha256` (a file's bytes), `content_hash` (an input file, a DICOM series folder or an
array), `content_fingerprint` (a few sampled blocks: for names of shared folders only),
`digest` (a JSON-able object) and `volscan_version`. Files are read once per process while
they are unchanged, because the validation pass, the cohort run and `volscan score`'s checks
all ask for the same inputs' hashes. How the keys are composed from these: `volumetric.cache_keys`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from volumetric.errors import InputFileError

_SAMPLES, _BLOCK = 16, 1 << 16
# {(what, device, inode, size, mtime in ns, real path): hex digest} of the files this process read.
_DIGESTS: dict[tuple[str, int, int, int, int, str], str] = {}


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(source: str | os.PathLike[str] | np.ndarray | Any) -> str:
    """Hex SHA-256 of an input file's bytes; of every file of a DICOM series folder (their
    hashes, sorted by name); or of an array's dtype, shape and values (C order; a torch tensor
    is hashed as its numpy array). A missing or unreadable path: `InputFileError` naming it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = _files(path)
        if not path.is_dir():
            return _remembered(path, "sha256", file_sha256)
        digest = hashlib.sha256()
        for file in files:
            digest.update(_remembered(file, "sha256", file_sha256).encode())
        return digest.hexdigest()
    if hasattr(source, "detach"):  # a torch tensor, without importing torch here
        source = source.detach().cpu().numpy()
    array = np.ascontiguousarray(source)
    digest = hashlib.sha256()
    digest.update(f"array:{array.dtype.str}:{array.shape};".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def content_size(path: Path) -> int:
    """Bytes of an input file, or of every file of a DICOM series folder: equal content, equal size."""
    return sum(file.stat().st_size for file in _files(Path(path)))


def content_fingerprint(path: Path) -> str:
    """Short identity of an input's content that reads at most `_SAMPLES` blocks of `_BLOCK`
    bytes per file, whatever its size: its size and evenly spaced blocks from its first to its
    last byte (a gzip file's last 8 bytes are the CRC-32 and length of its whole uncompressed
    content). For names of shared folders (`volumetric.cache_keys.store_name`), never for
    correctness: every stored file is keyed by the full `content_hash`."""
    digest = hashlib.sha256()
    for file in _files(Path(path)):
        digest.update(_remembered(file, "sampled", _sampled_sha256).encode())
    return digest.hexdigest()[:32]


def digest(obj: object, length: int = 32) -> str:
    """The first `length` hex characters of the SHA-256 of a JSON-able object (keys sorted;
    values JSON cannot hold are written as `str`); `length=64`: the whole hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def package_version(name: str) -> str:
    """The installed version of package `name`, or "unknown" when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def volscan_version() -> str:
    """The installed volscan's version, or "unknown" when volscan runs without being installed."""
    return package_version("volscan")


def _files(path: Path) -> list[Path]:
    """`path`, or the files of the folder `path` (sorted); `InputFileError` when there are none."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise InputFileError(path, "no such file or folder")
    return files


def _remembered(path: Path, what: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)`, remembered by this process while the file's inode, size and modification
    time stay the same; an unreadable file is an `InputFileError` naming it."""
    try:
        info = path.stat()
        key = (what, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, os.path.realpath(path))
        if key not in _DIGESTS:
            _DIGESTS[key] = compute(path)
    except OSError as exc:
        raise InputFileError(path, f"cannot read for hashing ({exc.strerror or exc})") from None
    return _DIGESTS[key]


def _sampled_sha256(file: Path) -> str:
    """SHA-256 of a file's size and `_SAMPLES` evenly spaced `_BLOCK`-byte blocks (the whole
    file when it is smaller than those blocks together)."""
    digest = hashlib.sha256()
    size = file.stat().st_size
    digest.update(f"{size};".encode())
    with open(file, "rb") as handle:
        if size <= _SAMPLES * _BLOCK:
            digest.update(handle.read())
        else:
            for i in range(_SAMPLES):
                handle.seek((size - _BLOCK) * i // (_SAMPLES - 1))
                digest.update(handle.read(_BLOCK))
    return digest.hexdigest()
