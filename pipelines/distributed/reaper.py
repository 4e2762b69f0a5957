"""Stops the local Ray cluster of a volscan process that died without shutting it down.

`RayRunner` shuts its local cluster down on the way out, Ctrl-C and SIGTERM included; a
`kill -9` or an out-of-memory kill gives it no chance, and some of Ray's processes (its
dashboard agent) outlive their raylet. So while a local cluster runs, `Reaper` keeps a small
watcher process (`python -m pipelines.distributed.reaper PID`) holding the read end of a pipe
whose write end only volscan holds. Every second the watcher records the Ray processes below
volscan (GCS, raylet, agents, workers; by /proc, Linux); when the pipe closes (volscan exited,
however) it kills those still running, each checked by its start time so that a reused process
id is never hit. After a normal exit the cluster is already down and nothing is left to kill.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

POLL_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of process `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (name) ": the name may hold spaces
    return int(fields[1]), int(fields[19])


def _is_ray(pid: int) -> bool:
    try:
        return b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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


def watch(parent: int, pipe: int) -> None:
    """Record `parent`'s Ray descendants until `pipe` closes, then kill those still running."""
    seen: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([pipe], [], [], POLL_S)
        if ready and not os.read(pipe, 4096):
            break
        seen.update(ray_descendants(parent))
    for pid, start in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
