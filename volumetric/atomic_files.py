"""Atomic file writes shared by every package: write to a temporary name beside the target,
then `os.replace`, so a crash never leaves a partial file under the final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask_mode(directory: bool = False) -> int:
    """Permission bits a plain `open`/`mkdir` would give under the user's umask; `tempfile`
    creates 0600 files and 0700 folders, which would keep outputs from colleagues."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` lets writers that pick the format from the name (nibabel: `.nii.gz`) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write `payload` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)
