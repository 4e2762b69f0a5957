"""Where a command may write, and atomic outputs that only volscan's own marker lets it replace.

A run is built in a hidden sibling folder and renamed into place at the end, so a crash,
Ctrl-C, SIGTERM or bad input part-way leaves OUT untouched (absent, or the previous run when
`--force` was given) and removes the temporary folder; nothing half-written looks complete.

Every finished output holds `volscan-run.json` (`RUN_MARKER`): a format tag, the command that
wrote it and the SHA-256 of each file it wrote. An output written in place (`volscan preprocess`)
holds a marker with `"complete": false` until the command finishes, so an interrupted one
(`kill -9`) never looks finished. A run killed before its rename leaves its hidden temporary
folder, owned through `volscan-partial.json` (process id and host); the next run into the same
OUT removes it once that process is gone, and nothing else. `--force` replaces a folder only when that
marker names the same command, never a folder that merely holds a common file name such as
report.json, and readers (`volscan evaluate`) check the checksums of what they read.
No output may overlap an input: OUT equal to, containing, or inside an input folder is refused.
Single files rewritten in place (by `volscan evaluate`) go through `atomic_write_*`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from volumetric.atomic_files import atomic_write_bytes, process_running, umask_mode
from volumetric.errors import InputFileError

log = logging.getLogger(__name__)

RUN_MARKER = "volscan-run.json"
MARKER_FORMAT = "volscan-run/1"
PARTIAL_MARKER = "volscan-partial.json"
PARTIAL_FORMAT = "volscan-partial/1"


def read_run_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a volscan output folder, or None when absent or not volscan's format."""
    path = Path(folder) / RUN_MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("command"), str):
        return None
    return marker


def _checksums(folder: Path) -> dict[str, str]:
    from volumetric.backbones import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RUN_MARKER)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def write_run_marker(folder: str | Path, command: str, *, complete: bool = True) -> Path:
    """Write `folder`/volscan-run.json naming `command`, with the SHA-256 of every file in `folder`;
    `complete=False`: the folder is volscan's but its command has not finished (no checksums)."""
    from importlib.metadata import PackageNotFoundError, version

    folder = Path(folder)
    try:
        release = version("volscan")
    except PackageNotFoundError:
        release = "unknown"
    marker = {"format": MARKER_FORMAT, "command": command, "volscan_version": release,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "complete": complete,
              "checksums": _checksums(folder) if complete else {}}
    return atomic_write_bytes(folder / RUN_MARKER, json.dumps(marker, indent=1).encode("utf-8"))


def verify_run(folder: str | Path, command: str, prefixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """Check that `folder` is a finished `command` output and that every file it recorded whose
    path starts with one of `prefixes` is unchanged; raise `InputFileError` naming the first bad one."""
    from volumetric.backbones import file_sha256

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "folder does not exist")
    marker = read_run_marker(folder)
    if marker is None or marker["command"] != command:
        raise InputFileError(folder, f"not a finished volscan {command} output (no {RUN_MARKER} naming '{command}')")
    if marker.get("complete") is False:
        raise InputFileError(folder, f"volscan {command} did not finish writing it (interrupted); rerun volscan {command}")
    for name, digest in marker.get("checksums", {}).items():
        if not name.startswith(tuple(prefixes)):
            continue
        path = folder / name
        if not path.is_file():
            raise InputFileError(path, f"missing from the run; rerun volscan {command}")
        if file_sha256(path) != digest:
            raise InputFileError(path, f"damaged or edited since volscan {command} wrote it (checksum mismatch); "
                                       f"rerun volscan {command}")
    return marker


def _overlap(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an OUT equal to, containing, or inside any of the `inputs` (folders or files)."""
    target = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if target == source or target in source.parents:
            raise InputFileError(out, f"output folder would replace the input {source}; choose another -o")
        if source in target.parents:
            raise InputFileError(out, f"output folder lies inside the input folder {source}; choose a folder outside the inputs")


def _writable_probe(out: Path, folder: Path) -> None:
    try:  # a real probe: permissions, read-only mounts and ACLs all show up here
        probe = tempfile.mkdtemp(prefix=".volscan-write-probe-", dir=folder)
    except OSError as exc:
        raise InputFileError(out, f"cannot write the output: {folder} is not writable ({exc.strerror})") from None
    os.rmdir(probe)


def check_output_dir(
    out_dir: str | Path,
    force: bool = False,
    protected: Iterable[str | Path] = (),
    command: str = "screen",
    *,
    resume: bool = False,
) -> Path:
    """Refuse, before any work, an OUT that overlaps one of the `protected` inputs (equal, parent
    or child), is a file, cannot be written, or exists and is not a previous `command` output
    (its `volscan-run.json`). Without `resume`, an existing OUT also needs `force` (it will be
    replaced); with `resume` (`volscan preprocess`) a previous output is written into."""
    out = Path(out_dir).absolute()
    _overlap(out, protected)
    if out.is_symlink() and not out.exists():
        raise InputFileError(out, "output path is a broken symbolic link")
    if out.exists():
        if not out.is_dir():
            raise InputFileError(out, "output path exists and is not a folder")
        if not force and not resume:
            raise InputFileError(out, "output folder already exists; use --force to replace it")
        marker = read_run_marker(out)
        if any(out.iterdir()) and (marker is None or marker["command"] != command):
            # --force replaces a previous output, never an arbitrary folder (a typo could be $HOME).
            found = f"it is a volscan {marker['command']} output" if marker else f"no valid {RUN_MARKER}"
            raise InputFileError(out, f"exists and is not a previous volscan {command} output ({found}); "
                                      "refusing to write into or replace it")
        if resume:
            _writable_probe(out, out)
    parent = out.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputFileError(out, f"cannot create the output folder: {parent} is not a folder")
    _writable_probe(out, parent)
    return out


@contextmanager
def resumable_output(out: Path, command: str) -> Iterator[Path]:
    """An output written in place and resumed by later runs (`volscan preprocess`), OUT already
    checked by `check_output_dir(..., resume=True)`: created with its marker on entry. If the
    command fails before finishing any file (a bad template, a full disk at the first cube), a
    folder it created is removed again; finished files stay for the next run to resume from."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_run_marker(out, command, complete=False)  # until it finishes: a killed run never looks done
    try:
        yield out
    except BaseException:
        if created and not any(p.is_file() and p.name != RUN_MARKER for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_run_marker(out, command)


class AtomicOutputDir:
    """Context manager yielding a temporary folder that becomes `out_dir` on success.

    `command` names the volscan command writing it (its marker; `--force` only replaces a
    previous output of the same command); `protected` are the inputs OUT must not overlap.

    >>> with AtomicOutputDir("run1", force=False) as tmp:
    ...     (tmp / "scores.csv").write_text("...")
    """

    def __init__(
        self, out_dir: str | Path, force: bool = False, protected: Iterable[str | Path] = (), command: str = "screen"
    ) -> None:
        self.out = check_output_dir(out_dir, force, protected, command)
        self.force = force
        self.command = command
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            _claim(self.tmp, self.command)
        except OSError as exc:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputFileError(self.out, f"cannot create the output folder ({exc.strerror})") from None
        os.chmod(self.tmp, umask_mode(directory=True))
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException as error:
                self._discard(error)
                raise
            return
        self._discard(exc)  # any failure, KeyboardInterrupt and SIGTERM included

    def _discard(self, exc: BaseException | None) -> None:
        """Remove the temporary folder; an OSError then names the file's place under OUT (the
        hidden temporary folder is gone), or OUT itself when the writer named no file."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            name = os.fspath(exc.filename) if exc.filename is not None else None
            if name is None:
                exc.filename = str(self.out)
            elif isinstance(name, str) and name.startswith(str(self.tmp)):
                exc.filename = str(self.out) + name[len(str(self.tmp)):]

    def commit(self) -> None:
        """Mark the finished temporary folder and move it to OUT (an old OUT is moved aside first)."""
        (self.tmp / PARTIAL_MARKER).unlink()
        write_run_marker(self.tmp, self.command)
        if self.out.exists():
            marker = read_run_marker(self.out)
            if not self.force or (any(self.out.iterdir()) and (marker is None or marker["command"] != self.command)):
                raise InputFileError(self.out, "output folder appeared or changed during the run; nothing replaced "
                                               "(use --force to replace a previous run)")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            _claim(old, self.command)
            os.replace(self.out, old / "previous")
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        log.info("wrote %s", self.out)


def _claim(folder: Path, command: str) -> None:
    """Mark `folder` as this process's temporary output (`remove_abandoned` reads it). A plain
    write: a torn file does not parse, and then the folder is left alone, never removed."""
    owner = {"format": PARTIAL_FORMAT, "command": command, "pid": os.getpid(), "host": socket.gethostname()}
    (folder / PARTIAL_MARKER).write_text(json.dumps(owner), encoding="utf-8")


def remove_abandoned(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier runs into `out` that were killed before they
    finished (`kill -9`, power loss): hidden siblings `.<name>.partial-*` / `.old-*` holding
    volscan's `volscan-partial.json` of a process on this host that no longer runs. Anything
    else (another host's run, a live run, a folder volscan did not mark) is left alone."""
    removed = []
    for folder in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        try:
            owner = json.loads((folder / PARTIAL_MARKER).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if _abandoned(owner):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by an interrupted volscan %s run (process %d)", folder,
                     owner.get("command"), owner["pid"])
            removed.append(folder)
    return removed


def _abandoned(owner: Any) -> bool:
    """Whether a `volscan-partial.json` names a process of this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("format") != PARTIAL_FORMAT or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not process_running(pid)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
