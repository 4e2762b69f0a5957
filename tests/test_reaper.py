"""The local Ray cluster's watcher (`pipelines.distributed.reaper`) finds the cluster's processes
by what they hold, not only by the parent links it recorded: a process orphaned since the last
record, holding a file in the cluster's session folder, is found; other processes are not."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.distributed import reaper

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="the watcher reads /proc (Linux)")


@pytest.fixture
def session(tmp_path: Path) -> Path:
    folder = tmp_path / "ray" / "session_2026-12-08_00-25-00_765673_4242"
    (folder / "logs").mkdir(parents=True)
    return folder


def _holding(path: Path, name: str) -> subprocess.Popen:
    """A `sleep` whose command line starts with `name`, holding `path` open on fd 3."""
    script = f'exec 3>>"{path}"; exec -a "{name}" sleep 120'
    process = subprocess.Popen(["bash", "-c", script])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the exec'd sleep holds the file under its new name
        try:
            if reaper._cmdline(process.pid).startswith(name.encode()) and os.readlink(f"/proc/{process.pid}/fd/3") == str(path):
                return process
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("the test process did not start")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_session_folder_read_from_a_command_line() -> None:
    cmdline = b"gcs_server\0--log_dir=/tmp/ray/session_2026-12-08_00-25-00_765673_10946/logs\0--port=0\0"
    assert reaper.SESSION_FOLDER.findall(cmdline) == [b"/tmp/ray/session_2026-12-08_00-25-00_765673_10946"]
    assert reaper.SESSION_FOLDER.findall(b"ray\0start\0--temp-dir=/tmp/ray\0") == []


def test_cluster_processes_by_session_file_and_by_record(session: Path, tmp_path: Path, processes: list) -> None:
    agent = _holding(session / "logs" / "dashboard_agent.log", "ray::DashboardAgent")
    reader = _holding(session / "logs" / "raylet.out", "tail")  # not Ray's: a user reading its log
    elsewhere = _holding(tmp_path / "other.log", "ray::IDLE")  # another cluster's worker
    processes += [agent, reader, elsewhere]
    folders = {os.fsencode(session)}
    found = reaper.cluster_processes({}, folders)
    assert agent.pid in found
    assert reader.pid not in found and elsewhere.pid not in found
    # A recorded process counts only while its start time matches (a reused id is never hit).
    start = reaper._stat(elsewhere.pid)[1]
    assert elsewhere.pid in reaper.cluster_processes({elsewhere.pid: start}, set())
    assert elsewhere.pid not in reaper.cluster_processes({elsewhere.pid: start + 1}, set())
