"""Atomic file writes shared by every package: write to a temporary name beside the target,
then `os.replace`, so a crash never leaves a partial file under the final name.

A temporary is named `.<name>.volscan-<host>-<pid>-<random><suffix>`: it says which process
of which host writes it. A run killed before its `os.replace` (`kill -9`, power loss) leaves it
behind; every reader ignores it, and `remove_stale_temporaries` (called when a run opens a
shared cache folder for writing) removes those whose process is gone from this host. The writer
holds an exclusive `flock` on its temporary while it writes, so a live writer of another PID
namespace that shares this host's name keeps its file too. Anything else (another host's, a live
process's, a file volscan did not name) is left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Linux and macOS file systems limit one name to 255 bytes.
_NAME_MAX = 255
# `tempfile`'s random part is lowercase letters, digits and "_"; pid and random hold no "-" and
# the host no ".", so the last ".volscan-" and the "-"s after it split a name unambiguously.
_TEMPORARY = re.compile(r"\..*\.volscan-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>[0-9]+)-[a-z0-9_]+(\..*)?", re.DOTALL)
_TIDIED: set[str] = set()


def umask_mode(directory: bool = False) -> int:
    """Permission bits a plain `open`/`mkdir` would give under the user's umask; `tempfile`
    creates 0600 files and 0700 folders, which would keep outputs from colleagues."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def host_tag() -> str:
    """This host's name as it appears in temporaries: letters, digits and "-" kept, anything
    else (the dots of a domain name) "_", so a name holds no "." before its suffix."""
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "_"


def process_running(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process can have
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` lets writers that pick the format from the name (nibabel: `.nii.gz`) see the right one.
    The temporary's name carries this host and process (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f".volscan-{host_tag()}-{os.getpid()}-"
    # Room for "." + owner + 8 random characters + suffix; a long target name is shortened in
    # the temporary only (it is there for people, ownership is in the rest).
    room = _NAME_MAX - len(f".{owner}{suffix}".encode()) - 8
    name = path.name.encode()[:room].decode(errors="ignore")
    fd, temporary = tempfile.mkstemp(prefix=f".{name}{owner}", suffix=suffix, dir=path.parent)
    tmp = Path(temporary)
    try:
        _lock(fd)  # held until the file is in place (writers reopen it by name: the same inode)
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # A failed write (disk full, quota) names no file: name the one being written.
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> Path:
    """Write `payload` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def _lock(fd: int) -> None:
    """An exclusive flock on our new temporary `fd`; on a file system without locks, none (then
    only the pid and age rules protect the file)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.debug("no lock on a temporary file here", exc_info=True)


def _locked(path: str) -> bool:
    """Whether a live writer holds the lock of `path` (its `atomic_path`, in any PID namespace)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # RDWR: NFS emulates flock with fcntl locks
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: the pid and age rules decide
        return False
    finally:
        os.close(fd)
    return False


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_path`'s temporaries (of any host or process)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike[str], min_age_s: float = 3600.0) -> int:
    """Remove the temporaries of `atomic_path` in `folder` (not below it) that a killed volscan
    process of this host left: named by this host, their process gone, their lock free (a live
    writer holds it, in whichever PID namespace), and last written at least `min_age_s` seconds
    ago. The age also guards where there are no locks (some network file systems) and a shared
    file system whose clock differs a little from ours.
    Returns how many were removed (logged at INFO); 0 for a missing or unreadable folder."""
    host, now, removed = host_tag(), time.time(), 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # missing or unreadable: nothing this run could tidy
        return 0
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["host"] != host or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        try:
            stale = now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s
            if pid < 1 or not stale or process_running(pid) or _locked(entry.path):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another run removed it first
        except OSError as exc:  # e.g. no write permission here: the run itself will say so if it matters
            log.debug("could not remove %s: %s", entry.path, exc)
            continue
        removed += 1
    if removed:
        log.info("removed %d temporary file(s) left in %s by interrupted volscan runs", removed, folder)
    return removed


def tidy_before_writing(folder: str | os.PathLike[str]) -> int:
    """`remove_stale_temporaries(folder)` the first time this process is about to write into
    `folder`, 0 afterwards: one directory listing per folder and process, however many scans a
    worker writes there."""
    key = os.path.abspath(folder)
    if key in _TIDIED:
        return 0
    _TIDIED.add(key)
    return remove_stale_temporaries(key)
