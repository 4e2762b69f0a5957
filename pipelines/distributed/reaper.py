"""Stops the local Ray cluster of a volscan process that died without shutting it down.

`RayRunner` shuts its local cluster down on the way out, Ctrl-C and SIGTERM included; a
`kill -9` or an out-of-memory kill gives it no chance, and some of Ray's processes outlive their
raylet (its agents, which on the raylet's death try to report to the already dead GCS for a
minute). So while a local cluster runs, `Reaper` keeps a small watcher process (`python -m
pipelines.distributed.reaper PID`) holding the read end of a pipe whose write end only volscan
holds. Every second the watcher records the Ray processes below volscan (GCS, raylet, agents,
workers; by /proc, Linux) and the cluster's session folders named on their command lines. When
the pipe closes (volscan exited, however) it kills the recorded processes still running, each
checked by its start time so that a reused process id is never hit, and every Ray process that
holds a file in one of those session folders: that also finds a process started after the last
record and orphaned since (its raylet, killed with volscan, no longer links it to volscan). After
a normal exit the cluster is already down and nothing is left to kill.
"""
from __future__ import annotations

import importlib.util
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0  # seconds between records
KILL_PASSES = 4  # sweeps at the end, each killing what the previous one missed
# Where the Ray package lives (its binaries and scripts are named by this path); found without importing it.
_RAY_SPEC = importlib.util.find_spec("ray")
RAY_PACKAGE = os.fsencode(os.path.dirname(_RAY_SPEC.origin)) + b"/" if _RAY_SPEC and _RAY_SPEC.origin else b""
SESSION_FOLDER = re.compile(rb"(/[^\0=]*/session_\d{4}-\d\d-\d\d_[^/\0]+)")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of process `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (name) ": the name may hold spaces
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_ray(pid: int) -> bool:
    """A Ray process: a binary or script of the Ray package, or a worker or agent (`ray::...`)."""
    cmdline = _cmdline(pid)
    return cmdline.startswith(b"ray::") or bool(RAY_PACKAGE) and RAY_PACKAGE in cmdline


def _session_folders(pid: int) -> set[bytes]:
    """The Ray session folders (`.../session_<date>_<pid>`) named on process `pid`'s command line."""
    return set(SESSION_FOLDER.findall(_cmdline(pid)))


def _holds_file_in(pid: int, folders: set[bytes]) -> bool:
    """Whether process `pid` has a file open below one of `folders`."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:  # gone, or a file descriptor closed while listing
        return False
    return any(os.fsencode(link).startswith(folder + b"/") for link in links for folder in folders)


def ray_descendants(root: int) -> dict[int, int]:
    """{pid: start time} of the Ray processes below process `root` (this watcher excluded)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[1]
    found, todo = {}, list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        if pid != os.getpid() and _is_ray(pid):
            found[pid] = starts[pid]
    return found


def cluster_processes(seen: dict[int, int], folders: set[bytes]) -> list[int]:
    """Running processes of the cluster: those of `seen` ({pid: start time}) whose start time
    still matches, and the Ray processes holding a file below one of the session `folders`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        stat = _stat(pid)
        if stat is None:
            continue
        if seen.get(pid) == stat[1] or (folders and _is_ray(pid) and _holds_file_in(pid, folders)):
            found.append(pid)
    return found


def watch(parent: int, pipe: int) -> None:
    """Record `parent`'s Ray descendants and their session folders until `pipe` closes, then kill
    the cluster's processes still running (a few passes: one may be starting another)."""
    seen: dict[int, int] = {}
    folders: set[bytes] = set()
    while True:
        ready, _, _ = select.select([pipe], [], [], POLL_S)
        if ready and not os.read(pipe, 4096):
            break
        found = ray_descendants(parent)
        for pid in found.keys() - seen.keys():
            folders |= _session_folders(pid)
        seen.update(found)
    for _ in range(KILL_PASSES):
        alive = cluster_processes(seen, folders)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(POLL_S / 4)


class Reaper:
    """The watcher of this process's local Ray cluster (see the module docstring): `start()`
    after the cluster is up, `stop()` after it was shut down."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Launch the watcher; Linux only (elsewhere nothing is watched)."""
        if not Path("/proc/self/stat").exists():
            return
        # Its stdin is the pipe; Ctrl-C and SIGTERM sent to the whole group leave it running
        # until volscan itself is gone (it ignores both).
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.distributed.reaper", str(os.getpid())], stdin=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )

    def stop(self) -> None:
        """Close the pipe (the watcher kills what is left, normally nothing) and wait for it."""
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=30)
            self._process = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.stdin.fileno())
