"""Brain extractors: settings, `auto`'s choice, deepbet on the real SRI-24 head, HD-BET plumbing.

HD-BET cannot run here (its weights download from the internet); its command line, weights
lookup (given folder, cache, one-time download from a local zip) and messages are tested.
"""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest
from test_preprocessing_data import dice, small_template

import preprocessing.volume
from pipelines.cli import main
from preprocessing import learned_masks
from preprocessing.brain_mask import TEMPLATE_WARNING, choose_mask_method, guess_contrast
from preprocessing.cohort import SubjectSpec, preprocess_cohort
from preprocessing.io import load_volume, save_volume
from preprocessing.resample import resample_to_grid
from preprocessing.settings import PreprocessSettings
from volumetric.errors import VolscanError

SIZE = 28


@pytest.fixture(scope="module")
def template(sri24_dir, tmp_path_factory):
    return small_template(sri24_dir, tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def head(sri24_dir):
    return load_volume(sri24_dir / "sri24_t1_brats.nii.gz")


def test_settings_are_checked_before_any_work():
    with pytest.raises(VolscanError, match="unknown setting 'mask_method'"):
        PreprocessSettings.from_mapping({"mask_method": "template"})
    with pytest.raises(VolscanError, match="'size' is a top-level setting"):
        PreprocessSettings.from_mapping({"size": 28}, size=28)
    with pytest.raises(VolscanError, match="Nyúl cutoff"):
        PreprocessSettings(cutoff=(0.5, 0.6))
    with pytest.raises(VolscanError, match="unknown brain mask method 'bet'"):
        PreprocessSettings(brain_mask="bet")
    with pytest.raises(VolscanError, match="margin_mm must be a number >= 0"):
        PreprocessSettings(margin_mm=-1.0)
    with pytest.raises(VolscanError, match="multiple of 14"):
        PreprocessSettings(size=30)
    settings = PreprocessSettings.from_mapping(
        {"brain-mask": "deepbet", "cutoff": [0.02, 0.98], "registration": {"shrink_factors": [2, 1], "smoothing_mm": [2, 0]}},
        size=28,
    )
    assert settings.brain_mask == "deepbet" and settings.cutoff == (0.02, 0.98)
    assert settings.registration.shrink_factors == (2, 1) and settings.size == 28
    # One object derives the key: a setting that changes the output changes the key.
    assert settings.spatial_key("t", "deepbet") != settings.replace(margin_mm=5.0).spatial_key("t", "deepbet")
    # HD-BET masks depend on the weights folder that made them; other methods ignore that option.
    assert (settings.replace(hdbet_weights="/a").spatial_key("t", "hd-bet")
            != settings.replace(hdbet_weights="/b").spatial_key("t", "hd-bet"))
    assert (settings.replace(hdbet_weights="/a").spatial_key("t", "deepbet")
            == settings.replace(hdbet_weights="/b").spatial_key("t", "deepbet"))
    with pytest.raises(AttributeError):
        settings.size = 56


@pytest.mark.parametrize(
    "name, contrast",
    [("IXI002-Guys-0828-T2.nii.gz", "t2"), ("BraTS-MET-00001-000-t1c.nii.gz", "t1c"), ("sub-01_T1w.nii.gz", "t1"),
     ("case_flair.nii", "flair"), ("scan.nii.gz", "other")],
)
def test_contrast_from_file_name(name, contrast):
    assert guess_contrast(name) == contrast


def test_auto_prefers_learned_extractors_and_warns_on_the_template():
    assert choose_mask_method("auto", True, "auto", "a_T1.nii.gz", True, True).method == "nonzero"
    assert choose_mask_method("auto", False, "auto", "a_T2.nii.gz", True, True).method == "hd-bet"
    choice = choose_mask_method("auto", False, "auto", "a_T1.nii.gz", False, True)
    assert (choice.method, choice.contrast, choice.warning) == ("deepbet", "t1", None)
    fallback = choose_mask_method("auto", False, "t2", None, False, False)
    assert fallback.method == "template" and fallback.warning == TEMPLATE_WARNING
    assert "template" in choose_mask_method("template", False, "auto", None, True, True).warning


@pytest.mark.slow  # deepbet always works at 256^3: ~6 CPU s per call
def test_deepbet_matches_sri24_brain_mask(head, sri24_dir):
    """deepbet on the head with skull vs SRI-24's own brain mask (stored in another voxel order)."""
    reference = load_volume(sri24_dir / "sri24_t1_brats_skullstripped.nii.gz")
    truth = resample_to_grid((reference.array > 0).astype(np.float32), reference.affine, head.array.shape,
                             head.affine, order=0) > 0
    mask = learned_masks.deepbet_mask(head)
    assert mask.shape == head.array.shape
    assert dice(mask, truth) >= 0.97


@pytest.mark.slow  # two deepbet calls
def test_cohort_records_the_extractor_and_the_template_warning(template, head, tmp_path, monkeypatch, caplog):
    small = resample_to_grid(head.array, head.affine, template.image.array.shape, template.image.affine, order=1)
    path = save_volume(small, template.image.affine, tmp_path / "in" / "IXI001-T1.nii.gz")
    settings = PreprocessSettings(size=SIZE, registered=True)
    learned = preprocess_cohort([SubjectSpec(path)], tmp_path / "a", settings, template=template.folder, progress=False)
    assert learned.records[0].brain_mask == "deepbet" and learned.records[0].warnings == ()
    mapping = learned.records[0].load_mapping()
    expected = mapping.to_cube(learned_masks.deepbet_mask(load_volume(path)), order=0)
    np.testing.assert_array_equal(load_volume(learned.records[0].mask_path).array > 0, expected)
    # Without a learned extractor, `auto` falls back to the template mask and says so, per scan.
    monkeypatch.setattr(preprocessing.volume, "deepbet_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        fallback = preprocess_cohort([SubjectSpec(path)], tmp_path / "b", settings, template=template.folder, progress=False)
    assert fallback.records[0].brain_mask == "template"
    assert fallback.records[0].warnings == (TEMPLATE_WARNING,)
    assert any("IXI001-T1.nii.gz" in r.getMessage() and TEMPLATE_WARNING in r.getMessage() for r in caplog.records)


def _weights_zip(path, top="release_2.0.0"):
    with zipfile.ZipFile(path, "w") as bundle:
        for name in learned_masks.HDBET_FILES:
            bundle.writestr(f"{top}/{name}", "{}")
    return path


def test_hdbet_weights_lookup_download_once_and_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLSCAN_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "hd-bet" / learned_masks.HDBET_RELEASE
    assert learned_masks.default_hdbet_dir() == cache
    # Offline and nothing cached: one clear message naming the way out.
    with pytest.raises(VolscanError, match="could not be downloaded.*--hdbet-weights DIR"):
        learned_masks.download_hdbet_weights(cache, (tmp_path / "missing.zip").as_uri())
    assert not cache.exists() and [p.name for p in (tmp_path / "cache" / "hd-bet").iterdir()] == []
    with pytest.raises(VolscanError, match="holds no HD-BET weights"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as bundle:
            bundle.writestr("readme.txt", "no weights")
        learned_masks.download_hdbet_weights(cache, bad.as_uri())
    # Online once: fetched into volscan's cache; later runs find it there without the network.
    archive = _weights_zip(tmp_path / "weights.zip")
    assert learned_masks.download_hdbet_weights(cache, archive.as_uri()) == cache
    archive.unlink()
    assert learned_masks.hdbet_weights_dir() == cache
    # A local folder (offline use): the release folder itself or its parent; an incomplete one is named.
    local = tmp_path / "local"
    with zipfile.ZipFile(_weights_zip(tmp_path / "w2.zip")) as bundle:
        bundle.extractall(local)
    assert learned_masks.hdbet_weights_dir(local) == local / learned_masks.HDBET_RELEASE
    (local / learned_masks.HDBET_RELEASE / "plans.json").unlink()
    with pytest.raises(VolscanError, match=r"local.*not an HD-BET weights folder \(missing plans.json\)"):
        learned_masks.hdbet_weights_dir(local)


def test_hdbet_command_line_messages(template, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    save_volume(template.image.array, template.image.affine, src / "a_T2.nii.gz")
    out = tmp_path / "out"
    args = ["preprocess", str(src), "-o", str(out), "--template", str(template.folder), "--size", str(SIZE),
            "--brain-mask", "hd-bet"]
    monkeypatch.setattr(preprocessing.volume, "hdbet_installed", lambda: False)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs HD-BET: pip install" in err[0] and "--brain-mask deepbet" in err[0]
    # Installed, with a wrong local weights folder: refused before any volume is preprocessed.
    monkeypatch.setattr(preprocessing.volume, "hdbet_installed", lambda: True)
    assert main(args + ["--hdbet-weights", str(tmp_path / "nowhere"), "--mask-device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: not an HD-BET weights folder" in err[0]
    assert not [p for p in out.rglob("*") if p.parent.name in ("records", "spatial", "masks")]
