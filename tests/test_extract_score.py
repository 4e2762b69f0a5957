"""`volscan extract` + `volscan score` (no Ray): same scores.csv as `volscan screen`, `--part`
shards merged, resumability, the error log, and refusals that name the missing scans.

The cohort is test_screen's: eight 32^3 volumes in the world space of a procedural template,
tiny random ViT, cube 28, `--registered --skull-stripped` (no registration, so it is fast).
"""

from __future__ import annotations

import importlib.abc
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_screen import WORLD, screen_setup, write_config
from test_screen_2d import make_images

from pipelines.cli import main
from pipelines.distributed.extract import ExtractSettings, run_extract
from pipelines.distributed.sharding import Part
from pipelines.subjects import discover_subjects
from pipelines.screen_config import resolve_config
from volumetric.errors import VolscanError

@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    """The cohort, its settings as CLI arguments, and the reference scores.csv of `volscan screen`."""
    setup = screen_setup(tmp_path_factory.mktemp("extract"), tiny_vit_spec, cache="cache-screen")
    root, settings = setup["root"], setup["base"]
    assert main(["screen", *settings, "-o", str(root / "screen")]) == 0
    return {"root": root, "images": setup["images"], "template": setup["template"], "config": setup["config"],
            "settings": settings, "ids": sorted(setup["truth"]),
            "reference": (root / "screen" / "scores.csv").read_bytes()}


def score(cohort: dict, cache: Path, name: str) -> bytes:
    """`volscan score` from `cache` into a new run folder; its scores.csv bytes."""
    out = cohort["root"] / name
    assert main(["score", *cohort["settings"], "--cache", str(cache), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["tokens"]["computed"] == 0  # the group stage extracted nothing
    return (out / "scores.csv").read_bytes()


def config_for(cohort: dict, cache: Path):
    """The `ScreenConfig` the CLI arguments give, with `cache`."""
    return resolve_config(cohort["config"], template=str(cohort["template"]), registered=True,
                          skull_stripped=True, cache=str(cache))


def subjects_of(cohort: dict) -> list:
    return discover_subjects(cohort["images"], None, registered=True, skull_stripped=True)[0]


class _NoRay(importlib.abc.MetaPathFinder):
    """Records (and refuses) every import of `ray` while installed."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "ray" or name.startswith("ray."):
            self.attempts.append(name)
            raise ImportError(f"{name} imported by a plain local run")
        return None


def test_extract_then_score_matches_screen_and_never_imports_ray(cohort: dict, monkeypatch) -> None:
    # `ray` is installed (and may already be imported by test_ray.py): hide it and refuse imports.
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    blocker = _NoRay()
    monkeypatch.setattr(sys, "meta_path", [blocker, *sys.meta_path])
    cache, out = cohort["root"] / "cache-local", cohort["root"] / "local"
    assert main(["extract", *cohort["settings"], "-o", str(cache)]) == 0
    assert main(["score", *cohort["settings"], "--cache", str(cache), "-o", str(out)]) == 0
    assert blocker.attempts == [] and "ray" not in sys.modules
    assert (out / "scores.csv").read_bytes() == cohort["reference"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["tokens"]["computed"] == 0
    log = next((cache / "extract").glob("*/errors-all.jsonl"))
    assert log.read_text(encoding="utf-8") == ""  # no scan failed


def test_parts_merged_match_screen(cohort: dict) -> None:
    cache = cohort["root"] / "cache-parts"
    config, subjects = config_for(cohort, cache), subjects_of(cohort)
    seen: list[str] = []
    for i in (1, 2, 3):
        result = run_extract(subjects, config, ExtractSettings(part=Part(i, 3), stage="spatial", progress=False))
        assert result.scans == cohort["ids"][i - 1 :: 3] and not result.failed
        seen += result.scans
    assert sorted(seen) == cohort["ids"]
    run_extract(subjects, config, ExtractSettings(stage="landmarks", progress=False))
    computed = 0
    for i in (1, 2, 3):
        result = run_extract(subjects, config, ExtractSettings(part=Part(i, 3), stage="tokens", progress=False))
        assert not result.failed and list(result.workers) == [os.getpid()]  # local: this process
        computed += result.computed
    assert computed == len(cohort["ids"])
    assert score(cohort, cache, "parts") == cohort["reference"]
    # Resumable: a second run of a part finds everything cached.
    again = run_extract(subjects, config, ExtractSettings(part=Part(2, 3), stage="tokens", progress=False))
    assert again.computed == 0 and not again.failed


def test_parts_with_fixed_landmarks_run_in_one_pass(cohort: dict, tiny_vit_spec: dict, capsys) -> None:
    """With landmarks fixed in the config (here: the ones the screen learned), each part runs
    `--stage all` alone, no barrier; the merged parts score as the screen did."""
    learned = next((cohort["root"] / "cache-screen" / "preprocess").glob("*/landmarks.npy"))
    fixed = cohort["root"] / "fixed-landmarks.npy"
    fixed.write_bytes(learned.read_bytes())
    fixed.with_suffix(".json").write_bytes(learned.with_suffix(".json").read_bytes())
    config = write_config(cohort["root"] / "fixed.yaml", tiny_vit_spec, cohort["root"] / "unused",
                          preprocess={"landmarks": str(fixed)})
    settings = [cohort["settings"][0], "--config", str(config), *cohort["settings"][3:]]
    cache = cohort["root"] / "cache-fixed"
    for part in ("1/2", "2/2"):
        assert main(["extract", *settings, "-o", str(cache), "--part", part]) == 0
    out = cohort["root"] / "fixed"
    assert main(["score", *settings, "--cache", str(cache), "-o", str(out)]) == 0
    assert (out / "scores.csv").read_bytes() == cohort["reference"]
    # Scoring with other fixed landmarks must not restandardise the shared store: refused, named.
    other = cohort["root"] / "other-landmarks.npy"
    np.save(other, np.load(fixed) * 1.01)
    config.write_text(config.read_text(encoding="utf-8").replace(str(fixed), str(other)), encoding="utf-8")
    err = _refused_score(settings, cache, cohort["root"] / "fixed-other", capsys)
    assert f"not the fixed landmarks {other}" in err and "--stage" not in err


def test_part_order_of_stages_is_enforced(cohort: dict, capsys: pytest.CaptureFixture) -> None:
    cache = cohort["root"] / "cache-order"
    config, subjects = config_for(cohort, cache), subjects_of(cohort)
    assert main(["extract", *cohort["settings"], "-o", str(cache), "--part", "1/2"]) == 2
    assert "--stage spatial" in capsys.readouterr().err
    run_extract(subjects, config, ExtractSettings(part=Part(1, 2), stage="spatial", progress=False))
    with pytest.raises(VolscanError, match=r"spatial stage of 4 scan\(s\) has not run \(e\.g\. case01\)"):
        run_extract(subjects, config, ExtractSettings(stage="landmarks", progress=False))
    with pytest.raises(VolscanError, match="run --stage landmarks first"):
        run_extract(subjects, config, ExtractSettings(part=Part(1, 2), stage="tokens", progress=False))


def test_failed_scan_is_logged_and_the_cohort_goes_on(cohort: dict, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(cohort["images"].iterdir())[:4]:
        (images / path.name).write_bytes(path.read_bytes())
    # A readable header but no content: the spatial phase refuses this scan only.
    nib.save(nib.Nifti1Image(np.full((32, 32, 32), 5.0, np.float32), WORLD), str(images / "case99.nii.gz"))
    settings = [str(images), *cohort["settings"][1:]]
    cache = tmp_path / "cache"
    assert main(["extract", *settings, "-o", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "case99" in err and "errors-all.jsonl" in err
    log = next((cache / "extract").glob("*/errors-all.jsonl"))
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(e["id"], e["phase"]) for e in lines] == [("case99", "spatial")]
    assert "constant" in lines[0]["error"] and lines[0]["input"].endswith("case99.nii.gz")
    # The other four were extracted; score names the one that is missing and why.
    assert len(list((cache / "tokens").rglob("*.safetensors"))) == 4
    assert main(["score", *settings, "--cache", str(cache), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "1 scan(s) is missing: case99" in err and "constant" in err
    assert not (tmp_path / "run").exists()


def test_score_refuses_an_empty_cache_naming_scans(cohort: dict, tmp_path: Path, capsys) -> None:
    assert main(["score", *cohort["settings"], "--cache", str(tmp_path / "empty"), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "per-scan stage of 8 scan(s) is missing: case00, case01" in err and "volscan extract" in err


def test_2d_images_extract_in_parts_and_score_as_screen(tmp_path: Path, tiny_vit_spec: dict) -> None:
    """2D has no spatial phase and no landmarks: `--part` runs `--stage all` directly."""
    images, _ = make_images(tmp_path)
    spec = dict(tiny_vit_spec)
    config = write_config(tmp_path / "config.yaml", spec, tmp_path / "cache-screen")
    config.write_text(config.read_text(encoding="utf-8").replace("size: 28", "size: 42"), encoding="utf-8")
    settings = [str(images), "--config", str(config)]
    assert main(["screen", *settings, "--method", "musc", "-o", str(tmp_path / "screen")]) == 0
    for part in ("1/2", "2/2"):  # extract scores nothing: it takes no --method
        assert main(["extract", *settings, "-o", str(tmp_path / "cache"), "--part", part]) == 0
    assert main(["score", *settings, "--method", "musc", "--cache", str(tmp_path / "cache"),
                 "-o", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "scores.csv").read_bytes() == (tmp_path / "screen" / "scores.csv").read_bytes()


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_part_parse_refuses(text: str) -> None:
    with pytest.raises(VolscanError, match="--part"):
        Part.parse(text)


def test_parts_cover_sorted_ids_once() -> None:
    ids = [f"s{i:03d}" for i in range(23)][::-1]  # listing order must not matter
    parts = [Part.parse(f"{i}/5").select(ids) for i in range(1, 6)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert parts[0] == ["s000", "s005", "s010", "s015", "s020"]
    assert Part.parse(" 2 / 5 ") == Part(2, 5) and Part(2, 5).label == "part-2-of-5" and Part().label == "all"


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _refused_score(settings: list[str], cache: Path, out: Path, capsys: pytest.CaptureFixture) -> str:
    """Run `volscan score`, which must refuse (exit 2) without writing into the cache or `out`
    (nor claim to rebuild anything); its one error line (the rest of stderr is logging)."""
    capsys.readouterr()
    before = _cache_files(cache)
    assert main(["score", *settings, "--cache", str(cache), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("volscan score: error:")]
    assert len(lines) == 1 and _cache_files(cache) == before and not out.exists()
    assert "rebuilding" not in err  # score rebuilds nothing, and says so
    return lines[0]


def _four_scans(cohort: dict, folder: Path) -> list[str]:
    """A copy of four of the cohort's scans in `folder`; the screen arguments for it."""
    folder.mkdir()
    for path in sorted(cohort["images"].iterdir())[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    return [str(folder), *cohort["settings"][1:]]


def test_a_changed_scan_makes_a_new_cohort_store_and_score_never_rewrites_one(cohort: dict, tmp_path: Path,
                                                                             capsys) -> None:
    """One scan changes after a sharded extract: the cohort (named by its inputs' content) gets a
    new store, so no part mixes cubes standardised with landmarks learned on the old scan. Score
    names the missing scans and writes nothing; the part's tokens stage asks for the landmarks
    stage first; after the three stages score runs. The old store is left as it was."""
    settings, cache = _four_scans(cohort, tmp_path / "images"), tmp_path / "cache"
    stages = (("spatial", ("1/2", "2/2")), ("landmarks", ("1/1",)), ("tokens", ("1/2", "2/2")))
    for stage, parts in stages:
        for part in parts:
            assert main(["extract", *settings, "-o", str(cache), "--stage", stage, "--part", part]) == 0
    [old_store] = (cache / "preprocess").iterdir()
    old_files = _cache_files(old_store)
    changed = tmp_path / "images" / "case00.nii.gz"
    image = nib.load(str(changed))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[12:16, 12:16, 12:16] += 40.0
    nib.save(nib.Nifti1Image(data, image.affine), str(changed))
    assert main(["extract", *settings, "-o", str(cache), "--stage", "spatial", "--part", "1/2"]) == 0
    capsys.readouterr()
    assert main(["extract", *settings, "-o", str(cache), "--stage", "tokens", "--part", "1/2"]) == 2
    assert "landmarks are not learned yet; run --stage landmarks first" in capsys.readouterr().err
    err = _refused_score(settings, cache, tmp_path / "run", capsys)
    assert "per-scan stage of 4 scan(s) is missing: case00, case01, case02, case03" in err
    assert f"volscan extract {tmp_path / 'images'} --cache {cache}'" in err
    for stage, parts in stages:
        for part in parts:
            assert main(["extract", *settings, "-o", str(cache), "--stage", stage, "--part", part]) == 0
    assert main(["score", *settings, "--cache", str(cache), "-o", str(tmp_path / "run")]) == 0
    assert len(list((cache / "preprocess").iterdir())) == 2 and _cache_files(old_store) == old_files


def test_score_names_a_damaged_cube_or_token_set_and_leaves_it(cohort: dict, tmp_path: Path, capsys) -> None:
    settings, cache = _four_scans(cohort, tmp_path / "images"), tmp_path / "cache"
    assert main(["extract", *settings, "-o", str(cache)]) == 0
    cube = next((cache / "preprocess").glob("*/images/case02.nii.gz"))
    cube.write_bytes(cube.read_bytes()[:-7])  # truncated
    err = _refused_score(settings, cache, tmp_path / "run", capsys)
    assert "1 scan(s)" in err and "case02 (standardised cube images/case02.nii.gz damaged)" in err
    assert f"volscan extract {tmp_path / 'images'} --cache {cache}'" in err
    cube.unlink()  # now a damaged token set: named, and left as it is
    assert main(["extract", *settings, "-o", str(cache)]) == 0
    entry = sorted((cache / "tokens").rglob("*.safetensors"))[1]
    entry.write_bytes(entry.read_bytes()[:-5])
    err = _refused_score(settings, cache, tmp_path / "run", capsys)
    assert f"{entry}: not a readable token file" in err and "run volscan extract" in err


def test_score_refuses_and_screen_rebuilds_two_swapped_token_files(cohort: dict, tmp_path: Path, capsys) -> None:
    """Two scans' token files swapped in the cache: each is intact, only its header's key tells
    that it belongs to the other scan. Score refuses naming the file (and writes nothing);
    screen rebuilds both with a warning naming each and scores as before the swap."""
    settings, cache = _four_scans(cohort, tmp_path / "images"), tmp_path / "cache"
    assert main(["extract", *settings, "-o", str(cache)]) == 0
    assert main(["score", *settings, "--cache", str(cache), "-o", str(tmp_path / "clean")]) == 0
    a, b = sorted((cache / "tokens").rglob("*.safetensors"))[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    err = _refused_score(settings, cache, tmp_path / "run", capsys)
    assert "token file was written for another scan or settings" in err and (str(a) in err or str(b) in err)
    assert main(["screen", *settings, "--cache", str(cache), "-o", str(tmp_path / "rebuilt")]) == 0
    err = capsys.readouterr().err
    for path in (a, b):
        assert f"discarding corrupt token cache entry: {path}: token file was written for another scan" in err
    assert (tmp_path / "rebuilt" / "scores.csv").read_bytes() == (tmp_path / "clean" / "scores.csv").read_bytes()


def test_one_cache_whatever_the_inputs_template_and_cache_paths_are_spelled(cohort: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`extract` with relative paths (`--template template`), then `score` through another mount
    point of the same data with absolute paths and a copy of the template elsewhere: the same
    store and token files are found (cache keys hold content, not paths)."""
    _four_scans(cohort, tmp_path / "images")
    (tmp_path / "template").mkdir()
    for path in cohort["template"].iterdir():
        (tmp_path / "template" / path.name).write_bytes(path.read_bytes())
    other_template = Path(shutil.copytree(tmp_path / "template", tmp_path / "elsewhere" / "atlas"))
    config = cohort["settings"][cohort["settings"].index("--config") + 1]
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "images", "--config", config, "--template", "template", "--registered",
                 "--skull-stripped", "-o", "cache"]) == 0
    mount = tmp_path.parent / f"{tmp_path.name}-mount"
    mount.symlink_to(tmp_path)  # the same files at another path, as on another cluster node
    before = _cache_files(tmp_path / "cache")
    out = tmp_path / "run"
    assert main(["score", str(mount / "images"), "--config", config, "--template", str(other_template),
                 "--registered", "--skull-stripped", "--cache", str(mount / "cache"), "-o", str(out)]) == 0
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["tokens"]["computed"] == 0
    assert _cache_files(tmp_path / "cache") == before
