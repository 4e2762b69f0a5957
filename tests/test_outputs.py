"""Hidden temporary folders of `AtomicOutputDir` after `kill -9`: the next run removes only those
whose run is gone (its flock free), whichever PID namespace it ran in, and gives back a previous
OUT that a run killed mid-swap had moved aside."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_atomic_files import REPO, _dead_pid

from pipelines.run_folder import (PARTIAL_FORMAT, PARTIAL_MARKER, RUN_MARKER, AtomicOutputDir, remove_abandoned,
                               verify_run)
from volumetric.errors import InputFileError

# A `volscan`-like run into argv[1] (--force) writing report.json = argv[2]; it kills itself with
# SIGKILL at the step named by argv[2], or prints its temporary folder and waits to be killed.
RUN = """
import os, signal, sys, time
from pathlib import Path
import pipelines.run_folder as outputs

out, step = Path(sys.argv[1]), sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if step == "hashing":  # while the run marker hashes every output file
    outputs._checksums = die
if step == "swap":  # the previous OUT moved aside, the new one not yet in place
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if Path(dst).name == "previous":
            die()
    os.replace = replace
with outputs.AtomicOutputDir(out, force=True) as tmp:
    (tmp / "report.json").write_text(step, encoding="utf-8")
    if step == "wait":
        print(tmp, flush=True)
        time.sleep(120)
"""


def _run(out: Path, step: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), step], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _killed(out: Path, step: str) -> None:
    proc = _run(out, step)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL


def _owned(folder: Path, pid: int, **fields: object) -> Path:
    """A folder whose ownership file names `pid` of this host (nobody holds its lock)."""
    folder.mkdir()
    owner = {"format": PARTIAL_FORMAT, "command": "screen", "pid": pid, "host": socket.gethostname(), "locked": True}
    (folder / PARTIAL_MARKER).write_text(json.dumps({**owner, **fields}), encoding="utf-8")
    return folder


def _finished(out: Path, text: str) -> None:
    with AtomicOutputDir(out, force=out.exists()) as tmp:
        (tmp / "report.json").write_text(text, encoding="utf-8")


def test_a_live_run_of_another_pid_namespace_keeps_its_folder(tmp_path: Path) -> None:
    """A container sharing this host's name but not its PID namespace: the run's pid means nothing
    here (a dead pid stands for it), but it holds the flock, so its folder stays; after `kill -9`
    the kernel drops the lock and the next run removes the folder."""
    out = tmp_path / "out"
    proc = _run(out, "wait")
    try:
        tmp = Path(proc.stdout.readline().strip())
        marker = tmp / PARTIAL_MARKER
        owner = json.loads(marker.read_text(encoding="utf-8"))
        assert owner["pid"] == proc.pid
        marker.write_text(json.dumps({**owner, "pid": _dead_pid()}), encoding="utf-8")  # same inode: still locked
        assert remove_abandoned(out) == [] and (tmp / "report.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert remove_abandoned(out) == [tmp] and not tmp.exists()


def test_only_folders_whose_run_is_provably_gone_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead, out = _dead_pid(), tmp_path / "out"
    gone = _owned(tmp_path / ".out.partial-a", dead)
    kept = [
        _owned(tmp_path / ".out.partial-b", os.getpid()),  # lock free but the process runs: kept
        _owned(tmp_path / ".out.partial-c", dead, locked=False),  # no lock on that file system
        _owned(tmp_path / ".out.partial-d", dead, host="other-node"),
        _owned(tmp_path / ".out.partial-e", dead, format="volscan-partial/1"),  # an older run, never locked
        _owned(tmp_path / ".other.partial-f", dead),  # another OUT's
    ]
    user = tmp_path / ".out.partial-mine"  # no marker: not volscan's
    user.mkdir()
    real = fcntl.flock
    with monkeypatch.context() as patch:  # a file system refusing locks: nothing can be proved
        patch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks")))
        assert remove_abandoned(out) == []
    assert fcntl.flock is real and remove_abandoned(out) == [gone]
    assert all((folder / PARTIAL_MARKER).exists() for folder in kept) and user.is_dir()


def test_a_run_sweeps_the_abandoned_partial_folders_of_other_outputs_beside_it(tmp_path: Path) -> None:
    """`kill -9` of a run into OUT1, then the user writes OUT2: its folder is swept, under the
    same ownership rule; a live run's, another host's, an unmarked one and `.old-*` stay."""
    dead = _dead_pid()
    gone = _owned(tmp_path / ".out1.partial-a", dead)
    kept = [_owned(tmp_path / ".out1.partial-b", os.getpid()), _owned(tmp_path / ".out1.partial-c", dead, host="n2"),
            _owned(tmp_path / ".out1.old-d", dead)]  # may hold out1's previous output: out1's next run decides
    user = tmp_path / ".notes.partial-e"
    user.mkdir()
    _finished(tmp_path / "out2", "x")
    assert not gone.exists() and all((folder / PARTIAL_MARKER).exists() for folder in kept) and user.is_dir()
    assert (tmp_path / "out2" / "report.json").is_file()


def test_out_names_with_glob_characters_match_only_their_own_folders(tmp_path: Path) -> None:
    dead = _dead_pid()
    own = _owned(tmp_path / ".run[1].partial-a", dead)
    other = _owned(tmp_path / ".run1.partial-b", dead)  # `run[1]` as a pattern matches "run1"
    assert remove_abandoned(tmp_path / "run[1]") == [own] and other.is_dir()


def test_a_kill_while_hashing_the_outputs_leaves_a_folder_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _killed(out, "hashing")
    [left] = tmp_path.glob(".out.partial-*")
    assert not out.exists() and (left / PARTIAL_MARKER).exists()
    _finished(out, "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", RUN_MARKER]


def test_a_kill_in_the_middle_of_a_force_swap_gives_the_previous_output_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _finished(out, "previous run")
    _killed(out, "swap")
    assert not out.exists() and len(list(tmp_path.glob(".out.*"))) == 2  # .old-* (holding OUT) and .partial-*
    with pytest.raises(InputFileError, match="already exists"):  # given back, so it needs --force again
        AtomicOutputDir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "report.json").read_text(encoding="utf-8") == "previous run"
    verify_run(out, "screen")
    _finished(out, "next")
    assert (out / "report.json").read_text(encoding="utf-8") == "next"


def test_a_failed_swap_puts_the_previous_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _finished(out, "previous run")
    real = os.replace

    def refuse_new(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".out.partial-"):  # the finished run moving into place
            raise OSError(errno.EIO, "Input/output error", os.fspath(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(OSError):
        _finished(out, "new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "report.json").read_text(encoding="utf-8") == "previous run"
    verify_run(out, "screen")
