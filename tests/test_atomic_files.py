"""Atomic writes' temporaries: owned by host and process, and removed only when a killed volscan
process of this host left them (never another host's, a live run's, or a file volscan did not name)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_preprocessing_data import small_template

from preprocessing.cohort import SubjectSpec, preprocess_cohort
from preprocessing.io import save_volume
from preprocessing.settings import PreprocessSettings
from volumetric.atomic_files import atomic_path, host_tag, process_running, remove_stale_temporaries
from volumetric.token_cache import TokenCache
from volumetric.token_set import TokenSet

REPO = Path(__file__).resolve().parents[1]
HOUR = 3600.0

# Writes through `atomic_path`, says so, and waits inside the block to be killed.
WRITER = """
import sys, time
from volumetric.atomic_files import atomic_path
with atomic_path(sys.argv[1], suffix=sys.argv[2]) as tmp:
    tmp.write_bytes(b"half written")
    print(tmp, flush=True)
    time.sleep(120)
"""


def _dead_pid() -> int:
    """The pid of a process that ran and is gone (waited for, so not a zombie)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def _age(path: Path, seconds: float) -> Path:
    """Set `path`'s modification time `seconds` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def _temporary(folder: Path, name: str, host: str, pid: int, suffix: str = ".tmp", age: float = 2 * HOUR) -> Path:
    path = folder / f".{name}.volscan-{host}-{pid}-k3x_9q0a{suffix}"
    path.write_bytes(b"partial")
    return _age(path, age)


def _user_file(path: Path) -> Path:
    path.write_bytes(b"user data")
    return _age(path, 2 * HOUR)


def _killed_writer(target: Path, suffix: str = ".tmp") -> Path:
    """Run WRITER for `target`, `kill -9` it mid-write, and return the temporary it left."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), suffix], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        tmp = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and tmp.is_file() and not target.exists()
    assert tmp.name.startswith(f".{target.name}.volscan-{host_tag()}-{proc.pid}-") and tmp.name.endswith(suffix)
    return tmp


def test_temporary_names_carry_host_and_process_and_keep_the_suffix(tmp_path: Path) -> None:
    """nibabel picks the format from the name: the suffix survives; so does a target name of
    255 bytes (the temporary shortens its copy of it), and the file lands under the real name."""
    seen = []
    for target, suffix in ((tmp_path / "scan.nii.gz", ".tmp.nii.gz"), (tmp_path / ("é" * 120 + ".json"), ".tmp")):
        with atomic_path(target, suffix=suffix) as tmp:
            seen.append(tmp)
            tmp.write_bytes(b"done")
        assert target.read_bytes() == b"done" and not tmp.exists()
    short, long = (tmp.name for tmp in seen)
    assert short.startswith(f".scan.nii.gz.volscan-{host_tag()}-{os.getpid()}-") and short.endswith(".tmp.nii.gz")
    assert len(long.encode()) <= 255 and f".volscan-{host_tag()}-{os.getpid()}-" in long
    assert "." not in host_tag() and host_tag()


def test_only_temporaries_of_dead_processes_of_this_host_are_removed(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    host, dead = host_tag(), _dead_pid()
    gone = [_temporary(tmp_path, "a.safetensors", host, dead),
            _temporary(tmp_path, "b.nii.gz", host, dead, suffix=".tmp.nii.gz")]
    kept = [
        _temporary(tmp_path, "c.safetensors", host, os.getpid()),  # a live run (this one)
        _temporary(tmp_path, "d.safetensors", "other-node", dead),  # another host's: its pids are not ours
        _temporary(tmp_path, "e.safetensors", host, dead, age=60.0),  # written a minute ago
        _temporary(tmp_path, "f.safetensors", host, 1),  # init: always running (often another user's)
        _user_file(tmp_path / f".g.volscan-{host}-{dead}.tmp"),  # the user's: no random part
        _user_file(tmp_path / ".h.json.abc12345.tmp"),  # an older volscan's, no owner
        _user_file(tmp_path / f"i.volscan-{host}-{dead}-k3x_9q0a.tmp"),  # not hidden
    ]
    folder = tmp_path / f".j.volscan-{host}-{dead}-k3x_9q0a.tmp"  # a folder: never removed
    folder.mkdir()
    link = tmp_path / f".k.volscan-{host}-{dead}-k3x_9q0a.tmp"  # a link: never removed (nor its target)
    link.symlink_to(kept[0])
    os.utime(link, (time.time() - 2 * HOUR,) * 2, follow_symlinks=False)
    (tmp_path / "sub").mkdir()  # not below the folder
    nested = _temporary(tmp_path / "sub", "l.safetensors", host, dead)

    with caplog.at_level(logging.INFO, logger="volumetric.atomic_files"):
        assert remove_stale_temporaries(tmp_path) == 2
    assert not any(path.exists() for path in gone)
    assert all(path.is_file() for path in [*kept, nested]) and folder.is_dir() and link.is_symlink()
    assert f"removed 2 temporary file(s) left in {tmp_path}" in caplog.text
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_a_live_writer_of_another_pid_namespace_keeps_its_temporary(tmp_path: Path) -> None:
    """A container sharing this host's name but not its PID namespace: the writer's pid means
    nothing here (its temporary renamed to a dead pid stands for that), but it holds the file's
    flock while it writes, so even an old temporary stays; once it is killed, the file goes."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "t.safetensors"), ".tmp"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        written = Path(proc.stdout.readline().strip())
        foreign = _age(written.rename(tmp_path / f".t.safetensors.volscan-{host_tag()}-{_dead_pid()}-k3x_9q0a.tmp"),
                       2 * HOUR)
        assert remove_stale_temporaries(tmp_path) == 0 and foreign.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert remove_stale_temporaries(tmp_path) == 1 and not foreign.exists()


def test_a_kill_9_temporary_is_removed_when_the_token_cache_is_next_written(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "tokens")
    key, other = "ab" + "0" * 62, "ab" + "1" * 62  # one folder, <root>/ab
    left = _killed_writer(cache.path(key))
    tokens = TokenSet(layers=[torch.zeros(2, 2, 2, 3)], void=torch.zeros(2, 2, 2, dtype=torch.bool), grid=(2, 2, 2))
    cache.store(other, tokens)
    assert left.exists() and cache.load(other) is not None  # left a moment ago: within the grace period
    _age(left, 2 * HOUR)
    assert remove_stale_temporaries(left.parent) == 1 and not left.exists()

    third = "cd" + "0" * 62
    later = _age(_killed_writer(cache.path(third)), 2 * HOUR)
    assert cache.load(third) is None and later.exists()  # reading writes nothing
    cache.store(third, tokens)
    assert not later.exists() and cache.load(third) is not None


def test_a_kill_9_temporary_is_removed_when_the_preprocessing_store_is_next_written(sri24_dir: Path,
                                                                                    tmp_path: Path) -> None:
    template = small_template(sri24_dir, tmp_path / "template")
    scan = tmp_path / "scan.nii.gz"
    save_volume(template.brain, template.image.affine, scan)
    out = tmp_path / "store"
    left = [_age(_killed_writer(out / "images" / "scan.nii.gz", ".tmp.nii.gz"), 2 * HOUR),
            _age(_killed_writer(out / "records" / "scan.json"), 2 * HOUR)]
    other_host = _temporary(out / "images", "scan.nii.gz", "other-node", _dead_pid(), suffix=".tmp.nii.gz")
    settings = PreprocessSettings(size=28, brain_mask="template")
    result = preprocess_cohort([SubjectSpec(scan, registered=True, skull_stripped=True)], out, settings,
                               template=tmp_path / "template", progress=False)
    assert result.computed == ["scan"] and np.isfinite(result.records[0].load_image()).all()
    assert not any(path.exists() for path in left) and other_host.exists()


def test_a_process_we_may_not_signal_counts_as_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's process answers `os.kill(pid, 0)` with PermissionError (seen when the tests
    do not run as root, for pid 1 above): it is running, and its temporary stays."""
    dead = _dead_pid()
    path = _temporary(tmp_path, "a.safetensors", host_tag(), dead)

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert process_running(dead) and remove_stale_temporaries(tmp_path) == 0 and path.exists()
