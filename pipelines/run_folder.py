"""Where a command may write, and atomic outputs that only volscan's own marker lets it replace.

A run is built in a hidden sibling folder and renamed into place at the end, so a crash,
Ctrl-C, SIGTERM or bad input part-way leaves OUT untouched (absent, or the previous run when
`--force` was given) and removes the temporary folder; nothing half-written looks complete.

Every finished output holds `volscan-run.json` (`RUN_MARKER`): a format tag, the command that
wrote it and the SHA-256 of each file it wrote. An output written in place (`volscan preprocess`)
holds a marker with `"complete": false` until the command finishes, so an interrupted one
(`kill -9`) never looks finished. A run killed before its rename leaves its hidden temporary
folder, owned through `volscan-partial.json` (process id and host), on which the run holds an
exclusive `flock` for its whole life; the next run into the same OUT or beside it (same parent
folder) removes such a folder only when that lock is free (the kernel drops it when the process
dies, in any PID namespace) and the process is gone from this host, and nothing else. A run killed in the middle of a `--force` swap
(OUT moved aside, the new one not yet in place) gets the previous OUT back from the next run. `--force` replaces a folder only when that
marker names the same command, never a folder that merely holds a common file name such as
report.json, and readers (`volscan evaluate`) check the checksums of what they read.
No output may overlap an input: OUT equal to, containing, or inside an input folder is refused.
Single files rewritten in place (by `volscan evaluate`) go through `atomic_write_*`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from volumetric.atomic_files import atomic_path, atomic_write_bytes, process_running, umask_mode
from volumetric.errors import InputFileError

log = logging.getLogger(__name__)

RUN_MARKER = "volscan-run.json"
MARKER_FORMAT = "volscan-run/1"
PARTIAL_MARKER = "volscan-partial.json"
# /2: the owner holds a flock on the file. /1 folders (no lock, unreleased versions) are left alone.
PARTIAL_FORMAT = "volscan-partial/2"
PREVIOUS = "previous"  # inside a `.old-*` folder: the OUT a --force run is replacing


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
    from volumetric.hashing import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (RUN_MARKER, PARTIAL_MARKER))
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def write_run_marker(folder: str | Path, command: str, *, complete: bool = True, checksums: bool = True) -> Path:
    """Write `folder`/volscan-run.json naming `command`, with the SHA-256 of every file in `folder`
    (none with `checksums=False`, or `complete=False`: the folder is volscan's but its command
    has not finished)."""
    from volumetric.hashing import volscan_version

    folder = Path(folder)
    marker = {"format": MARKER_FORMAT, "command": command, "volscan_version": volscan_version(),
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "complete": complete,
              "checksums": _checksums(folder) if complete and checksums else {}}
    return atomic_write_bytes(folder / RUN_MARKER, json.dumps(marker, indent=1).encode("utf-8"))


def verify_run(folder: str | Path, command: str, prefixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """Check that `folder` is a finished `command` output and that every file it recorded whose
    path starts with one of `prefixes` is unchanged; raise `InputFileError` naming the first bad one."""
    from volumetric.hashing import file_sha256

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
    folder it created is removed again; finished files stay for the next run to resume from.
    The finished marker holds no checksums: the store's own records checksum each file and every
    reader checks those (`preprocessing.store`), so hashing the whole store again at the end of
    every run would only cost I/O."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_run_marker(out, command, complete=False)  # until it finishes: a killed run never looks done
    try:
        yield out
    except BaseException:
        if created and not any(p.is_file() and p.name != RUN_MARKER for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_run_marker(out, command, checksums=False)


class AtomicOutputDir:
    """Context manager yielding a temporary folder that becomes `out_dir` on success.

    `command` names the volscan command writing it (its marker; `--force` only replaces a
    previous output of the same command); `protected` are the inputs OUT must not overlap.
    Abandoned temporary folders of earlier runs into OUT are handled here, before any work
    (`remove_abandoned`): a previous OUT it restores needs `--force` like any other.

    >>> with AtomicOutputDir("run1", force=False) as tmp:
    ...     (tmp / "scores.csv").write_text("...")
    """

    def __init__(
        self, out_dir: str | Path, force: bool = False, protected: Iterable[str | Path] = (), command: str = "screen"
    ) -> None:
        self.out = check_output_dir(out_dir, force, protected, command)
        missing = not os.path.lexists(self.out)
        remove_abandoned(self.out)
        sweep_abandoned(self.out.parent)  # and those of killed runs into other OUTs beside it
        if missing and os.path.lexists(self.out):  # a restored previous OUT needs --force like any other
            self.out = check_output_dir(out_dir, force, protected, command)
        self.force = force
        self.command = command
        self.tmp: Path | None = None
        self._owner: int | None = None  # the locked volscan-partial.json of `tmp`

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            self._owner = _claim(self.tmp, self.command)
        except OSError as exc:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise InputFileError(self.out, f"cannot create the output folder ({exc.strerror})") from None
        os.chmod(self.tmp, umask_mode(directory=True))
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                try:
                    self.commit()
                except BaseException as error:
                    self._discard(error)
                    raise
                return
            self._discard(exc)  # any failure, KeyboardInterrupt and SIGTERM included
        finally:
            if self._owner is not None:
                os.close(self._owner)  # the folder is in place or gone: nothing left to own
                self._owner = None

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
        """Mark the finished temporary folder and move it to OUT (an old OUT is moved aside first).

        The ownership file stays until the folder is OUT, so a `kill -9` at any step leaves only
        folders that `remove_abandoned` recognises (and a previous OUT it can restore)."""
        write_run_marker(self.tmp, self.command)
        if not self.out.exists():
            os.replace(self.tmp, self.out)
        else:
            marker = read_run_marker(self.out)
            if not self.force or (any(self.out.iterdir()) and (marker is None or marker["command"] != self.command)):
                raise InputFileError(self.out, "output folder appeared or changed during the run; nothing replaced "
                                               "(use --force to replace a previous run)")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            old_owner = _claim(old, self.command)
            swapped = False
            try:
                os.replace(self.out, old / PREVIOUS)
                try:
                    os.replace(self.tmp, self.out)
                except BaseException:
                    os.replace(old / PREVIOUS, self.out)  # the previous OUT back in place
                    raise
                swapped = True
            finally:
                if swapped or not (old / PREVIOUS).exists():  # else it holds the only copy of OUT
                    shutil.rmtree(old, ignore_errors=True)
                os.close(old_owner)
        # Removed only once in place: a kill just before this leaves a stray volscan-partial.json in
        # a finished OUT (outside its checksums), never an unmarked hidden folder.
        (self.out / PARTIAL_MARKER).unlink(missing_ok=True)
        log.info("wrote %s", self.out)


def _claim(folder: Path, command: str) -> int:
    """Mark `folder` as this process's temporary output and return the descriptor of the marker,
    which holds an exclusive flock until closed (or the process dies). The lock is taken before
    the content is written, so a marker that parses is locked while its run lives; on a file
    system without locks the marker says `"locked": false` and the folder is never removed."""
    fd = os.open(folder / PARTIAL_MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, umask_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as exc:  # ENOLCK / EOPNOTSUPP (some network file systems)
            log.debug("no lock on %s (%s): if this run is killed its folder stays", folder, exc)
            locked = False
        owner = {"format": PARTIAL_FORMAT, "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                 "locked": locked}
        os.write(fd, json.dumps(owner).encode("utf-8"))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_abandoned(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier runs into `out` that were killed before they
    finished (`kill -9`, power loss): hidden siblings `.<name>.partial-*` / `.old-*` holding
    volscan's `volscan-partial.json` whose lock is free and whose process no longer runs on this
    host. When OUT is missing because such a run was killed between moving the previous OUT
    aside and moving its own in place, the previous OUT is put back first (logged as a warning).
    Anything else (another host's run, a live run in any PID namespace, a folder volscan did not
    mark, a file system without locks) is left alone."""
    pattern = glob.escape(f".{out.name}")
    folders = sorted(out.parent.glob(f"{pattern}.old-*")) + sorted(out.parent.glob(f"{pattern}.partial-*"))
    return [folder for folder in folders if _remove_if_abandoned(folder, out)]


def sweep_abandoned(parent: Path) -> list[Path]:
    """Remove the hidden `.<name>.partial-*` folders in `parent` that killed runs into any OUT
    left, under `remove_abandoned`'s ownership rule (a run into another OUT, or none since,
    would never remove them). `.old-*` folders are left to their own OUT's next run: one may
    hold the only copy of a previous output, which that run puts back."""
    return [folder for folder in sorted(parent.glob(".*.partial-*")) if _remove_if_abandoned(folder, None)]


def _remove_if_abandoned(folder: Path, out: Path | None) -> bool:
    """Remove `folder` if its run is provably gone (`_lock_abandoned`); for a `.old-*` folder of
    `out`, put the previous output it holds back first when OUT is missing. Whether removed."""
    fd = _lock_abandoned(folder)
    if fd is None:
        return False
    try:  # the lock is held until the folder is gone: two cleaning runs do not both act on it
        if out is not None and folder.name.startswith(f".{out.name}.old-") and (folder / PREVIOUS).is_dir() \
                and not os.path.lexists(out):
            os.replace(folder / PREVIOUS, out)
            log.warning("restored the previous output %s: the volscan run replacing it was killed "
                        "while swapping it", out)
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    log.info("removed %s, left by an interrupted volscan run", folder)
    return True


def _lock_abandoned(folder: Path) -> int | None:
    """The locked descriptor of `folder`'s ownership file when its run is gone: a locked format-2
    marker of this host, its lock free now and its process not running here; else None."""
    try:
        fd = os.open(folder / PARTIAL_MARKER, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # no marker (not volscan's), or not ours to write
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):  # a live run holds it, or no locks here, or torn
        os.close(fd)
        return None
    if _abandoned(owner):
        return fd
    os.close(fd)
    return None


def _abandoned(owner: Any) -> bool:
    """Whether a `volscan-partial.json` was locked by a process of this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("format") != PARTIAL_FORMAT or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    return owner.get("locked") is True and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 \
        and not process_running(pid)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_texts(files: Sequence[tuple[Path, str]]) -> None:
    """Write several UTF-8 files that belong together (a run's scores.csv, report.json and
    report.html): every temporary is written first, then all are renamed in the order given,
    one right after the other, so a crash while they are written (kill -9 included) leaves the
    previous set, not a new file beside an old one."""
    with ExitStack() as stack:
        # ExitStack leaves the last-entered first: enter in reverse to rename in the given order.
        temporaries = [(stack.enter_context(atomic_path(path)), text) for path, text in reversed(files)]
        for temporary, text in temporaries:
            temporary.write_text(text, encoding="utf-8")
