"""`volscan cache du|prune`, the cache size at the end of a run: what volscan wrote is measured
and pruned, and nothing else (a user's files, downloads, a live run's temporaries) is touched.

The cache is filled by `volscan extract` on test_screen's cohort (eight 32^3 volumes, tiny
random ViT), then salted with files volscan did not write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_atomic_files import _age, _dead_pid
from test_screen import screen_setup

from pipelines.cli import main
from volumetric.atomic_files import host_tag

DAY = 86400.0


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    setup = screen_setup(tmp_path_factory.mktemp("cache-command"), tiny_vit_spec)
    cache = setup["root"] / "filled"
    assert main(["extract", *setup["base"], "-o", str(cache)]) == 0
    return dict(setup, cache=cache)


def _salted(filled: dict, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A copy of the filled cache with files volscan did not write, a download and temporaries."""
    cache = Path(shutil.copytree(filled["cache"], tmp_path / "cache"))
    store = next((cache / "preprocess").iterdir())
    token_folder = next((cache / "tokens").iterdir())
    foreign = {
        "notes": cache / "notes.txt",  # the user's, at the top
        "in store": store / "images" / "my-segmentation.nii.gz",  # no record names it
        "fake token": token_folder / ("0" * 64 + ".safetensors"),  # volscan's name, not its content
        "other folder": cache / "preprocess" / "mine" / "data.bin",  # a folder with no store marker or record
    }
    for path in foreign.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"keep me")
    download = cache / "templates" / "sri24" / "sri24_t1_brats.nii.gz"
    download.parent.mkdir(parents=True)
    download.write_bytes(b"atlas")
    foreign["download"] = download
    stale = _temporary(store / f".x.nii.gz.volscan-{host_tag()}-{_dead_pid()}-abcd1234.tmp.nii.gz")
    foreign["live temporary"] = _temporary(store / f".y.nii.gz.volscan-{host_tag()}-{os.getpid()}-abcd1234.tmp")
    return cache, {**foreign, "stale temporary": stale}


def _temporary(path: Path) -> Path:
    """What `atomic_path` leaves when its process is killed, two hours ago."""
    path.write_bytes(b"half a cube")
    return _age(path, 2 * 3600)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_du_sorts_what_volscan_wrote_from_the_rest(filled: dict, tmp_path: Path, capsys) -> None:
    cache, _ = _salted(filled, tmp_path)
    before = _files(cache)
    capsys.readouterr()
    assert main(["cache", "du", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cache}: ")
    assert "preprocessing stores       1" in out and "(8 scans, " in out and " per scan)" in out
    assert "token sets                 8" in out
    assert "extract logs               1" in out
    assert "interrupted writes         2" in out and "not volscan's              4" in out
    assert _files(cache) == before  # du reads only


def test_prune_is_a_dry_run_without_yes(filled: dict, tmp_path: Path, capsys) -> None:
    cache, _ = _salted(filled, tmp_path)
    before = _files(cache)
    capsys.readouterr()
    assert main(["cache", "prune", str(cache), "--all"]) == 0
    assert capsys.readouterr().out.startswith("would remove 1 preprocessing store(s), 8 token set(s), 1 extract log(s)")
    assert _files(cache) == before


def test_prune_older_than_removes_only_volscans_old_entries(filled: dict, tmp_path: Path, capsys) -> None:
    cache, foreign = _salted(filled, tmp_path)
    tokens = sorted((cache / "tokens").rglob("*.safetensors"))
    tokens = [t for t in tokens if t != foreign["fake token"]]
    old = tokens[:3]
    for path in old:
        _age(path, 40 * DAY)
    for path in [*(p for name, p in foreign.items() if "temporary" not in name), *(cache / "extract").rglob("*.jsonl")]:
        _age(path, 40 * DAY)  # old, but not volscan's (the log is: it goes)
    capsys.readouterr()
    assert main(["cache", "prune", str(cache), "--older-than", "30", "--yes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 0 preprocessing store(s), 3 token set(s), 1 extract log(s)")
    assert not any(p.exists() for p in old) and all(p.exists() for p in tokens[3:])
    assert next((cache / "preprocess").glob("*/records")).is_dir()  # used by the extract just now
    assert not foreign["stale temporary"].exists()
    assert all(foreign[name].read_bytes() == b"keep me" for name in ("notes", "in store", "fake token", "other folder"))
    assert foreign["download"].read_bytes() == b"atlas" and foreign["live temporary"].exists()


def test_prune_all_then_the_next_run_recomputes(filled: dict, tmp_path: Path, capsys) -> None:
    cache, foreign = _salted(filled, tmp_path)
    store = next(p for p in (cache / "preprocess").iterdir() if p.name != "mine")
    assert main(["cache", "prune", str(cache), "--all", "--yes"]) == 0
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert left == sorted(str(p.relative_to(cache)) for name, p in foreign.items() if name != "stale temporary")
    assert not (store / "records").exists() and not (cache / "extract").exists()  # emptied folders go too
    assert store.is_dir()  # it still holds the user's file
    capsys.readouterr()
    argv = ["screen", *filled["base"], "--cache", str(cache), "-o", str(tmp_path / "run")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["tokens"]["computed"] == 8
    usage = report["cache"]
    assert usage["root"] == str(cache.resolve()) and usage["scans"] == 8
    assert 0 < usage["run_bytes"] < usage["total_bytes"]
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cache: "))
    assert line.startswith(f"cache: {cache.resolve()} holds ") and " per scan); volscan cache du / prune" in line


@pytest.mark.parametrize("argv, needle", [
    (["prune", "--older-than", "-1"], "--older-than must be a number of days >= 0"),
    (["prune", "--older-than", "nan"], "--older-than must be a number of days >= 0"),
    (["du"], "no such cache folder"),
])
def test_bad_cache_commands_are_one_line(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    where = tmp_path / "nothing-here"
    if argv[0] == "prune":
        where.mkdir()
    capsys.readouterr()
    assert main(["cache", argv[0], str(where), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
