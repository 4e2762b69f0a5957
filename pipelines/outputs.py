"""Atomic outputs: a run is built in a hidden sibling folder and renamed into place at the end.

A crash, Ctrl-C or bad input part-way leaves OUT untouched (absent, or the previous run when
`--force` was given) and removes the temporary folder, so nothing half-written looks complete.
Single files rewritten in place (by `volscan evaluate`) go through `atomic_write_*`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from volumetric.atomic_files import atomic_write_bytes, umask_mode
from volumetric.errors import InputFileError

log = logging.getLogger(__name__)

# A folder holding this file is a finished screen run that `--force` may replace; other
# commands pass their own marker (a phantom cohort's cohort.json, a reproduction's table.json).
RUN_MARKER = "report.json"


def check_output_dir(
    out_dir: str | Path, force: bool, protected: tuple[Path, ...] = (), marker: str = RUN_MARKER
) -> Path:
    """Refuse, before any work, an OUT that would replace (or contain) one of the `protected`
    folders (the inputs), is a file, exists without `force`, exists with `force` but is not a
    previous output of the same command (no `marker` file), or cannot be created."""
    out = Path(out_dir).absolute()
    for folder in protected:
        folder = Path(folder).resolve()
        target = out.resolve()
        if target == folder or target in folder.parents:
            raise InputFileError(out, f"output folder would replace the input folder {folder}")
    if out.exists():
        if not out.is_dir():
            raise InputFileError(out, "output path exists and is not a folder")
        if not force:
            raise InputFileError(out, "output folder already exists; use --force to replace it")
        if any(out.iterdir()) and not (out / marker).is_file():
            # --force replaces a previous output, never an arbitrary folder (a typo could be $HOME).
            raise InputFileError(out, f"exists and is not a previous volscan output (no {marker}); refusing to replace it")
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputFileError(out, f"cannot create the output folder: {parent} is not a folder")
    try:  # a real probe: permissions, read-only mounts and ACLs all show up here
        probe = tempfile.mkdtemp(prefix=".volscan-write-probe-", dir=parent)
    except OSError as exc:
        raise InputFileError(out, f"cannot create the output folder: {parent} is not writable ({exc.strerror})") from None
    os.rmdir(probe)
    return out


class AtomicOutputDir:
    """Context manager yielding a temporary folder that becomes `out_dir` on success.

    >>> with AtomicOutputDir("run1", force=False) as tmp:
    ...     (tmp / "scores.csv").write_text("...")
    """

    def __init__(
        self, out_dir: str | Path, force: bool = False, protected: tuple[Path, ...] = (), marker: str = RUN_MARKER
    ) -> None:
        self.out = check_output_dir(out_dir, force, protected, marker)
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except OSError as exc:
            raise InputFileError(self.out, f"cannot create the output folder ({exc.strerror})") from None
        os.chmod(self.tmp, umask_mode(directory=True))
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.commit()

    def commit(self) -> None:
        """Move the finished temporary folder to OUT (the old OUT, if any, is moved aside first)."""
        if self.out.exists():
            if not self.force:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise InputFileError(self.out, "output folder appeared during the run; use --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "previous")
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        log.info("wrote %s", self.out)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def system_errors_as_input_errors() -> Iterator[None]:
    """Turn an `OSError` (disk full, permission denied, file vanished) into one clear line for
    the CLI; the traceback stays available with -vv (debug log)."""
    try:
        yield
    except OSError as exc:
        log.debug("system error", exc_info=True)
        where = exc.filename if exc.filename is not None else "volscan"
        raise InputFileError(where, exc.strerror or str(exc)) from None
