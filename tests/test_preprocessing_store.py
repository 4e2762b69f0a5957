"""The preprocessing store rebuilds damaged or stale cache files (issue 9 item 3).

Every case damages one file of a finished cohort folder the way a disk, a killed process or a
curious user would, reruns, and checks: a warning naming the file, the subject (or landmarks)
rebuilt, the outputs equal to a clean run's, and a further rerun that computes nothing.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from test_preprocessing_data import small_template

from preprocessing.cohort import SubjectSpec, preprocess_cohort
from preprocessing.io import load_volume, save_volume
from preprocessing.settings import PreprocessSettings

SIZE = 28
SETTINGS = PreprocessSettings(size=SIZE, registered=True, skull_stripped=True)


@pytest.fixture(scope="module")
def cohort(sri24_dir, tmp_path_factory):
    """(template folder, subject specs, a clean finished output folder)."""
    root = tmp_path_factory.mktemp("store")
    template = small_template(sri24_dir, root / "template")
    rng = np.random.default_rng(0)
    specs = []
    for i, scale in enumerate((0.5, 20.0)):
        noisy = template.brain * scale * (1 + 0.05 * rng.standard_normal(template.brain.shape)) * (template.brain > 0)
        path = save_volume(noisy.astype(np.float32), template.image.affine, root / "in" / f"s{i}.nii.gz")
        specs.append(SubjectSpec(path))
    clean = root / "clean"
    preprocess_cohort(specs, clean, SETTINGS, template=root / "template", progress=False)
    return root / "template", specs, clean


def _outputs(out):
    """Every output's content: arrays for NIfTI files, bytes otherwise (records excluded)."""
    content = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.parent.name != "records":
            rel = str(path.relative_to(out))
            content[rel] = load_volume(path).array.tobytes() if rel.endswith(".nii.gz") else path.read_bytes()
    return content


def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_mapping(path):
    mapping = json.loads(path.read_text())
    mapping["template_to_native"][0][3] += 7.5  # a plausible, wrong translation
    path.write_text(json.dumps(mapping))


def _edit_landmarks(path):
    values = np.load(path)
    np.save(path, values * 1.1)  # still 13 increasing values: only the checksum can tell


def _non_monotone_landmarks(path):
    values = np.load(path)
    values[5], values[6] = values[6], values[5]
    np.save(path, values)


def _edit_record(path):
    record = json.loads(path.read_text())
    record["spatial_files"]["spatial/s0.nii.gz"] = "0" * 64
    path.write_text(json.dumps(record))


DAMAGE = {
    "bit-flipped mapping json": ("mappings/s0.json", lambda p: _flip_bit(p, p.read_text().index("template_to_native") + 30)),
    "edited mapping json": ("mappings/s0.json", _edit_mapping),
    "bit-flipped itk transform": ("transforms/s1.tfm", _flip_bit),
    "truncated spatial cube": ("spatial/s0.nii.gz", _truncate),
    "truncated mask": ("masks/s1.nii.gz", _truncate),
    "bit-flipped mask": ("masks/s0.nii.gz", _flip_bit),
    "truncated standardised cube": ("images/s1.nii.gz", _truncate),
    "edited landmarks": ("landmarks.npy", _edit_landmarks),
    "non-monotone landmarks": ("landmarks.npy", _non_monotone_landmarks),
    "truncated landmarks": ("landmarks.npy", _truncate),
    "edited record": ("records/s0.json", _edit_record),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_cache_file_is_rebuilt_with_a_warning(cohort, tmp_path, caplog, case):
    template, specs, clean = cohort
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    relative, damage = DAMAGE[case]
    before = (out / relative).read_bytes()
    damage(out / relative)
    assert (out / relative).read_bytes() != before
    # Cache folders (`volscan screen`) and output folders (`volscan preprocess`) both rebuild damage.
    for stale in ("recompute", "error"):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            result = preprocess_cohort(specs, out, SETTINGS, template=template, stale=stale, progress=False)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if stale == "recompute":
            assert any(str(out / relative) in w and "rebuilding" in w for w in warnings), warnings
            rebuilt_subject = relative.split("/")[1].split(".")[0] if "/" in relative else None
            if rebuilt_subject and not relative.startswith("images/"):
                assert result.computed == [rebuilt_subject]
        else:  # the rerun after the rebuild finds everything intact: nothing persists
            assert result.computed == [] and warnings == []
        assert _outputs(out) == _outputs(clean)


def test_stale_settings_are_rebuilt_in_cache_mode(cohort, tmp_path):
    template, specs, clean = cohort
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    other = SETTINGS.replace(margin_mm=8.0)
    result = preprocess_cohort(specs, out, other, template=template, stale="recompute", progress=False)
    assert result.computed == ["s0", "s1"]
    fresh = preprocess_cohort(specs, tmp_path / "fresh", other, template=template, progress=False)
    assert _outputs(out) == _outputs(tmp_path / "fresh")
    assert fresh.landmarks.digest == result.landmarks.digest


def test_records_name_the_settings_and_checksums(cohort):
    _, _, clean = cohort
    record = json.loads((clean / "records" / "s0.json").read_text())
    assert record["settings"]["size"] == SIZE and record["settings"]["mask_method"] == "nonzero"
    assert record["mask"]["method"] == "nonzero"
    assert set(record["spatial_files"]) == {"spatial/s0.nii.gz", "masks/s0.nii.gz", "mappings/s0.json", "transforms/s0.tfm"}
    assert set(record["final_files"]) == {"images/s0.nii.gz"}
    assert len(record["checksum"]) == 64
    assert json.loads((clean / "landmarks.json").read_text())["digest"]


FLOAT32_EPS = float(np.finfo(np.float32).eps)  # float32 rounding of the scaled values
SUBJECT_FILES = ("images/{}.nii.gz", "spatial/{}.nii.gz", "masks/{}.nii.gz", "mappings/{}.json", "transforms/{}.tfm")


@pytest.mark.parametrize("swap", ["cubes", "whole subjects"])
def test_two_subjects_swapped_are_rebuilt_with_a_warning_and_refused_read_only(cohort, tmp_path, caplog, swap):
    """Swapping two subjects' standardised cubes, or every file of theirs records included: the
    record binds each file (checksum by path) and itself (subject id) to its subject's key."""
    from preprocessing.cohort import check_store

    template, specs, clean = cohort
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    names = SUBJECT_FILES[:1] if swap == "cubes" else (*SUBJECT_FILES, "records/{}.json")
    for name in names:
        a, b = out / name.format("s0"), out / name.format("s1")
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
    first = out / names[-1].format("s0")
    with caplog.at_level(logging.WARNING):
        check = check_store(specs, out, SETTINGS, template=template)  # `volscan score`: reads only
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(check.scans) == ["s0", "s1"]
    assert any(str(first) in w for w in warnings) and not any("rebuilding" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        preprocess_cohort(specs, out, SETTINGS, template=template, stale="recompute", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(first) in w and "rebuilding" in w for w in warnings), warnings
    if swap == "whole subjects":
        assert any("written for subject 's1', not 's0'" in w for w in warnings), warnings
    assert _outputs(out) == _outputs(clean)
    assert check_store(specs, out, SETTINGS, template=template).complete


def test_cubes_are_stored_as_scaled_int16_within_half_a_step(cohort, tmp_path):
    """The store's cubes take int16 with a scale factor: within max|cube| / 65534 (+ float32
    rounding) of the float32 cube, zero kept; the standardised cube equals Nyúl applied to the
    stored spatial cube up to that step."""
    import nibabel as nib

    from preprocessing.intensity import Landmarks, standardize

    _, _, clean = cohort
    for name in ("images/s1.nii.gz", "spatial/s1.nii.gz"):
        image = nib.load(str(clean / name))
        assert image.get_data_dtype() == np.int16 and image.header.get_slope_inter()[1] in (0.0, None)
    spatial = load_volume(clean / "spatial/s1.nii.gz").array
    mask = load_volume(clean / "masks/s1.nii.gz").array > 0
    stored = load_volume(clean / "images/s1.nii.gz").array
    exact = standardize(spatial, mask, Landmarks.load(clean / "landmarks.npy"))
    top = float(np.abs(exact).max())
    assert np.abs(stored - exact).max() <= top / 65534 + 4 * FLOAT32_EPS * top
    assert np.array_equal(stored[exact == 0], exact[exact == 0])
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((9, 10, 11)) * 300).astype(np.float32)
    values[2:4] = 0
    back = load_volume(save_volume(values, np.eye(4), tmp_path / "q.nii.gz", scaled_int16=True)).array
    top = float(np.abs(values).max())
    assert np.abs(back - values).max() <= top / 65534 + 4 * FLOAT32_EPS * top
    assert not back[2:4].any() and back.dtype == np.float32
