"""Cohort runs and `volscan preprocess`: outputs, per-subject modes, resuming, --force, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from test_preprocessing_data import dice, known_affine, small_template, warped_copy

from pipelines.cli import main
from preprocessing.io import load_volume, save_volume
from preprocessing.cohort import SubjectSpec, preprocess_cohort
from preprocessing.settings import PreprocessSettings
from preprocessing.volume import VolumePreprocessor
from volumetric.errors import InputFileError, VolscanError

SIZE = 28
# The template mask keeps these tests fast; learned extractors: tests/test_preprocessing_masks.py.
SETTINGS = PreprocessSettings(size=SIZE, brain_mask="template")


@pytest.fixture(scope="module")
def template_dir(sri24_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    small_template(sri24_dir, folder)
    return folder


@pytest.fixture(scope="module")
def inputs(template_dir, tmp_path_factory):
    """A raw scan (warped, scanner scale x3) and two 'BraTS-like' ones (template space, skull-stripped)."""
    from preprocessing.template import load_template

    template = load_template(template_dir)
    folder = tmp_path_factory.mktemp("inputs")
    centre = template.image.affine @ np.r_[(np.array(template.image.array.shape) - 1) / 2, 1]
    image, _, affine = warped_copy(template, known_affine(centre=centre[:3]), codes="LPS")
    save_volume(image * 3.0, affine, folder / "raw_01.nii.gz")
    save_volume(template.brain * 0.5, template.image.affine, folder / "brats_01.nii.gz")
    save_volume(template.brain * 20.0, template.image.affine, folder / "brats_02.nii")
    return folder


def _specs(inputs):
    return [
        SubjectSpec(inputs / "raw_01.nii.gz"),
        SubjectSpec(inputs / "brats_01.nii.gz", registered=True, skull_stripped=True),
        SubjectSpec(inputs / "brats_02.nii", registered=True, skull_stripped=True),
    ]


def test_mixed_cohort_outputs_and_resume(template_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = preprocess_cohort(_specs(inputs), out, SETTINGS, template=template_dir, progress=False)
    assert [r.id for r in result.records] == ["raw_01", "brats_01", "brats_02"]
    assert result.computed == ["raw_01", "brats_01", "brats_02"]
    cubes = {r.id: r.load_image() for r in result.records}
    masks = {r.id: r.load_mask() for r in result.records}
    for record in result.records:
        assert cubes[record.id].shape == masks[record.id].shape == (SIZE,) * 3
        assert np.all(cubes[record.id][~masks[record.id]] == 0)
        mapping = record.load_mapping()
        assert mapping.to_native(masks[record.id], order=0).shape == load_volume(record.source).array.shape
        assert record.transform_path.is_file()
    # One set of landmarks puts scanner scales x0.5 and x20 on the same scale.
    np.testing.assert_allclose(cubes["brats_01"], cubes["brats_02"], atol=1e-2)
    assert dice(masks["raw_01"], masks["brats_01"]) > 0.85
    assert result.landmarks_path.is_file() and result.landmarks_path.with_suffix(".json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = preprocess_cohort(_specs(inputs), out, SETTINGS, template=template_dir, progress=False)
    assert again.computed == []
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # Other settings over the same folder: refused unless forced, or recomputed for caches.
    with pytest.raises(VolscanError, match="--force"):
        preprocess_cohort(_specs(inputs)[1:], out, SETTINGS.replace(margin_mm=8.0), template=template_dir, progress=False)
    forced = preprocess_cohort(_specs(inputs)[1:], out, SETTINGS, template=template_dir, force=True, progress=False)
    assert forced.computed == ["brats_01", "brats_02"]


def test_reusing_landmarks_for_new_scans(template_dir, inputs, tmp_path):
    first = preprocess_cohort(_specs(inputs)[1:2], tmp_path / "a", SETTINGS, template=template_dir, progress=False)
    second = preprocess_cohort(
        _specs(inputs)[2:], tmp_path / "b", SETTINGS.replace(landmarks=str(first.landmarks_path)),
        template=template_dir, progress=False,
    )
    assert second.landmarks.digest == first.landmarks.digest
    np.testing.assert_allclose(second.records[0].load_image(), first.records[0].load_image(), atol=1e-2)


def test_parallel_workers_match_serial_run(template_dir, inputs, tmp_path):
    specs = _specs(inputs)[1:]
    serial = preprocess_cohort(specs, tmp_path / "serial", SETTINGS, template=template_dir, progress=False)
    parallel = preprocess_cohort(specs, tmp_path / "parallel", SETTINGS, template=template_dir, workers=2, progress=False)
    assert parallel.computed == ["brats_01", "brats_02"]
    for a, b in zip(serial.records, parallel.records):
        np.testing.assert_array_equal(a.load_image(), b.load_image())
    bad = tmp_path / "zero.nii.gz"
    save_volume(np.zeros((8, 8, 8), np.float32), np.eye(4), bad)
    with pytest.raises(InputFileError, match="zero.nii.gz: has one constant intensity"):
        preprocess_cohort([*specs, bad], tmp_path / "p2", SETTINGS, template=template_dir, workers=2, progress=False)
    with pytest.raises(VolscanError, match="workers"):
        preprocess_cohort(specs, tmp_path / "p3", template=template_dir, workers=0)


def test_duplicate_ids_and_bad_files(template_dir, inputs, tmp_path):
    with pytest.raises(VolscanError, match="share the subject id"):
        preprocess_cohort([inputs / "brats_01.nii.gz", tmp_path / "brats_01.nii"], tmp_path / "o", template=template_dir)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b broken")
    with pytest.raises(InputFileError, match="bad.nii.gz: not a readable NIfTI"):
        preprocess_cohort([bad], tmp_path / "o2", SETTINGS.replace(registered=True), template=template_dir, progress=False)
    assert not (tmp_path / "o2" / "images").exists()


def test_cli_preprocess(template_dir, inputs, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("brats_01.nii.gz", "brats_02.nii"):
        (src / name).write_bytes((inputs / name).read_bytes())
    (src / "notes.txt").write_text("ignored", encoding="utf-8")
    out = tmp_path / "out"
    args = ["preprocess", str(src), "-o", str(out), "--template", str(template_dir), "--size", str(SIZE),
            "--registered", "--skull-stripped"]
    assert main(args) == 0
    assert "2 computed" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").iterdir()) == ["brats_01.nii.gz", "brats_02.nii.gz"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["brats_01.nii.gz", "brats_02.nii.gz"]
    assert main(args) == 0
    assert "0 computed, 2 already done" in capsys.readouterr().out
    assert main([a if a != str(SIZE) else "42" for a in args]) == 2
    assert "--force" in capsys.readouterr().err
    (src / "broken.nii.gz").write_bytes(b"nope")
    assert main(args + ["--force"]) == 2
    err = capsys.readouterr().err.splitlines()  # progress bars share stderr; the error is the last line
    assert err[-1].startswith("volscan preprocess: error: ") and "broken.nii.gz: not a readable NIfTI" in err[-1]
    assert sum("error" in line for line in err) == 1
    assert main(["preprocess", str(src), "-o", str(out), "--template", str(tmp_path), "--size", "28"]) == 2
    assert "VOLSCAN_TEMPLATE" in capsys.readouterr().err
    assert main(["preprocess", str(src), "-o", str(out), "--template", str(template_dir), "--size", "30"]) == 2
    assert "multiple of 14" in capsys.readouterr().err


def test_preprocessor_reads_from_paths(template_dir, inputs):
    result = VolumePreprocessor(SETTINGS.replace(registered=True, skull_stripped=True), template_dir)(inputs / "brats_02.nii")
    assert result.cube.shape == (SIZE,) * 3 and result.brain_mask.any()


def test_check_store_is_read_only_and_names_what_is_not_current(template_dir, inputs, tmp_path):
    """`check_store` (what `volscan score` runs) reports missing, stale and damaged entries and the
    landmarks' state, and never writes: the folder's bytes are the same before and after."""
    from preprocessing.cohort import check_store

    def files(folder):
        return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    out, specs = tmp_path / "out", _specs(inputs)[1:]  # the two registered scans: no registration, fast
    empty = check_store(specs, out, SETTINGS, template=template_dir)
    assert empty.scans == {"brats_01": "not preprocessed", "brats_02": "not preprocessed"}
    assert empty.landmarks == "not learned yet" and not out.exists()
    preprocess_cohort(specs, out, SETTINGS, template=template_dir, progress=False)
    done = check_store(specs, out, SETTINGS, template=template_dir)
    assert done.complete and [r.id for r in done.result.records] == ["brats_01", "brats_02"]
    (out / "images" / "brats_02.nii.gz").write_bytes(b"damaged")
    (out / "records" / "brats_01.json").write_text("{", encoding="utf-8")  # a torn record: damaged, not missing
    before = files(out)
    other = SETTINGS.replace(cutoff=(0.05, 0.95))  # other settings: other landmarks would be learned
    assert check_store(specs, out, SETTINGS, template=template_dir).scans == {"brats_01": "record damaged",
                                                                              "brats_02": "standardised cube "
                                                                              "images/brats_02.nii.gz damaged"}
    assert check_store(specs, out, other, template=template_dir).landmarks == "learned on other scans or settings"
    assert files(out) == before


def test_a_library_failure_on_one_scan_is_one_line_naming_it(template_dir, inputs, tmp_path, monkeypatch, capsys):
    """A SimpleITK exception inside the spatial chain (first line: a C++ source location) becomes one
    line naming the scan and ITK's own message, in the API and on the command line (no traceback)."""
    def itk_failure(self, volume):
        raise RuntimeError("Exception thrown in SimpleITK Filter_Execute: /tmp/itkFilter.hxx:332:\n"
                           "ITK ERROR: RecursiveGaussianImageFilter(0x5622d6483900): Sigma must be greater than zero.")

    monkeypatch.setattr(VolumePreprocessor, "__call__", itk_failure)
    scan = inputs / "brats_01.nii.gz"
    with pytest.raises(InputFileError) as caught:
        preprocess_cohort([scan], tmp_path / "out", SETTINGS, template=template_dir, progress=False)
    assert caught.value.path == str(scan)
    assert caught.value.problem == ("preprocessing failed: RecursiveGaussianImageFilter: Sigma must be greater than "
                                    "zero. (details: -vv)")
    assert main(["preprocess", str(inputs), "-o", str(tmp_path / "cli"), "--template", str(template_dir),
                 "--size", str(SIZE), "--brain-mask", "template"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "preprocessing failed: RecursiveGaussianImageFilter: Sigma" in err


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), NotImplementedError("todo")])
def test_a_volscan_bug_in_the_spatial_chain_is_not_blamed_on_the_scan(bug, template_dir, inputs, tmp_path,
                                                                       monkeypatch):
    """Only the libraries' own failures (RuntimeError) become a per-scan line; a programming error
    (TypeError, NotImplementedError: a RuntimeError subclass) surfaces as itself."""
    def broken(self, volume):
        raise bug

    monkeypatch.setattr(VolumePreprocessor, "__call__", broken)
    with pytest.raises(type(bug)) as caught:
        preprocess_cohort([inputs / "brats_01.nii.gz"], tmp_path / "out", SETTINGS, template=template_dir,
                          progress=False)
    assert caught.value is bug
