"""Bad input to `volscan screen` / `volscan evaluate`: one clear line, exit 2, nothing written."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from test_bad_input import _one_error_line
from test_screen import screen_setup, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    return screen_setup(tmp_path_factory.mktemp("errors"), tiny_vit_spec)


def _copy_images(setup: dict, tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted(setup["images"].iterdir())[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def _fails(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    err = _one_error_line(captured.err)  # progress bars and log lines may precede it; nothing else
    assert err.startswith(f"volscan {argv[0]}: error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _screen(setup: dict, inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["screen", str(inputs), "-o", str(out), "--config", str(setup["config"]),
            "--template", str(setup["template"]), "--registered", "--skull-stripped", *extra]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_missing_and_empty_folders(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    _fails(_screen(setup, tmp_path / "nope", out), capsys, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a scan", encoding="utf-8")
    _fails(_screen(setup, tmp_path / "empty", out), capsys, "no inputs found")
    _nothing_written(out)


def test_mixed_2d_and_3d(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _copy_images(setup, tmp_path)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(inputs / "photo.png")
    _fails(_screen(setup, inputs, tmp_path / "out"), capsys, "mix", "separate runs")
    _nothing_written(tmp_path / "out")


def test_corrupt_files(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _copy_images(setup, tmp_path)
    (inputs / "broken.nii.gz").write_bytes(b"this is not a nifti file at all")
    _fails(_screen(setup, inputs, tmp_path / "out"), capsys, "broken.nii.gz", "not a readable NIfTI")
    _nothing_written(tmp_path / "out")


def test_truncated_volume_fails_in_preprocessing_without_output(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = _copy_images(setup, tmp_path)
    whole = gzip.decompress((inputs / "case00.nii.gz").read_bytes())
    (inputs / "a_truncated.nii.gz").write_bytes(gzip.compress(whole[: len(whole) // 2]))
    out = tmp_path / "out"
    _fails(_screen(setup, inputs, out, "--cache", str(tmp_path / "cache")), capsys, "a_truncated.nii.gz")
    _nothing_written(out)


def test_label_grid_mismatch_names_the_label(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _copy_images(setup, tmp_path)
    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), np.eye(4)), str(labels / "case00.nii.gz"))
    _fails(_screen(setup, inputs, tmp_path / "out", "--labels", str(labels)), capsys,
           str(labels / "case00.nii.gz"), "does not match")
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), shifted), str(labels / "case00.nii.gz"))
    _fails(_screen(setup, inputs, tmp_path / "out", "--labels", str(labels)), capsys,
           str(labels / "case00.nii.gz"), "affine")
    _nothing_written(tmp_path / "out")


def test_unwritable_output(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _copy_images(setup, tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    _fails(_screen(setup, inputs, blocker / "out"), capsys, "not a folder")
    _fails(_screen(setup, inputs, Path("/proc/volscan-out")), capsys, "not writable")
    _fails(_screen(setup, inputs, inputs, "--force"), capsys, "would replace the input")
    _fails(_screen(setup, inputs, tmp_path, "--force"), capsys, "would replace the input")
    _fails(_screen(setup, inputs, inputs / "run"), capsys, "inside the input folder")
    assert sorted(p.name for p in inputs.iterdir()) == ["case00.nii.gz", "case01.nii.gz", "case02.nii.gz"]


def test_bad_settings(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _copy_images(setup, tmp_path)
    out = tmp_path / "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text("size: 28\nmethdo: musc\n", encoding="utf-8")
    _fails(["screen", str(inputs), "-o", str(out), "--config", str(bad)], capsys, "unknown setting 'methdo'")
    bad.write_text("size: [28\n", encoding="utf-8")
    _fails(["screen", str(inputs), "-o", str(out), "--config", str(bad)], capsys, "cannot parse")
    _fails(_screen(setup, inputs, out, "--size", "30"), capsys, "multiple of 14")
    toml = tmp_path / "bad.toml"
    toml.write_text("[scoring]\nno_such_knob = 1\n", encoding="utf-8")
    _fails(["screen", str(inputs), "-o", str(out), "--config", str(toml), "--weights", "random",
            "--template", str(setup["template"]), "--registered", "--skull-stripped", "--size", "28",
            "--cache", str(tmp_path / "cache")], capsys, "no_such_knob")
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(inputs / "case00.nii.gz", single)
    _fails(_screen(setup, single, out), capsys, "at least 2")
    _nothing_written(out)


def test_evaluate_errors(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fails(["evaluate", str(tmp_path / "nothing"), "--labels", str(setup["labels"])], capsys, "does not exist")
    (tmp_path / "notarun").mkdir()
    _fails(["evaluate", str(tmp_path / "notarun"), "--labels", str(setup["labels"])], capsys, "volscan-run.json")


def test_all_void_tokens_explain_the_fix(setup: dict, tmp_path: Path, tiny_vit_spec: dict,
                                         capsys: pytest.CaptureFixture) -> None:
    """With the default void cut (50 % brain) no octant of the 2^3 grid is brain enough."""
    inputs = _copy_images(setup, tmp_path)
    config = write_config(tmp_path / "c.yaml", tiny_vit_spec, tmp_path / "cache")
    config.write_text(config.read_text(encoding="utf-8").replace("tokenizer: {void_fraction: 0.1}", ""))
    out = tmp_path / "out"
    _fails(["screen", str(inputs), "-o", str(out), "--config", str(config), "--template", str(setup["template"]),
            "--registered", "--skull-stripped"], capsys, "no usable token", "case00", "--size", "void_fraction")
    _nothing_written(out)


def test_bad_backbone_and_weights_fail_before_any_work(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = _copy_images(setup, tmp_path)
    out, cache = tmp_path / "out", tmp_path / "fresh-cache"
    _fails(_screen(setup, inputs, out, "--backbone", "vit_larg_patch14_dinov2", "--cache", str(cache)),
           capsys, "unknown backbone", "vit_large_patch14_dinov2")
    missing = tmp_path / "no-such-weights.safetensors"
    _fails(_screen(setup, inputs, out, "--weights", str(missing), "--cache", str(cache)),
           capsys, str(missing), "weights file not found")
    _nothing_written(out)
    assert not cache.exists()  # refused before preprocessing touched the cache


@pytest.mark.parametrize("command", ["screen", "score", "extract"])
def test_a_settings_typo_is_the_first_error(command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No input folder, no template, an OUT that exists: the backbone typo is still what is reported."""
    (tmp_path / "out").mkdir()
    target = ["-o", str(tmp_path / "out")] if command != "extract" else []
    _fails([command, str(tmp_path / "no-scans"), *target, "--backbone", "dinov3_vitx",
            "--template", str(tmp_path / "no-template")], capsys, "unknown backbone 'dinov3_vitx'")
    _fails([command, str(tmp_path / "no-scans"), *target, "--backbone", "classcal"], capsys, "did you mean 'classical'")


def test_vit_only_flags_are_refused_with_the_classical_backbone(setup: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    inputs, out = _copy_images(setup, tmp_path), tmp_path / "out"
    base = ["screen", str(inputs), "-o", str(out), "--backbone", "classical", "--template", str(setup["template"]),
            "--registered", "--skull-stripped", "--size", "28", "--cache", str(tmp_path / "cache")]
    _fails([*base, "--precision", "bf16"], capsys, "--backbone classical", "precision applies only to ViT")
    _fails([*base, "--slices-per-block", "4"], capsys, "slices-per-block applies only to ViT")
    _fails([*base, "--precision", "auto", "--proj-dim", "8"], capsys, "proj-dim, precision apply only to ViT")
    _nothing_written(out)
    assert not (tmp_path / "cache").exists()


def test_volume_settings_are_refused_for_2d_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_screen_2d import make_images

    images, _ = make_images(tmp_path)
    out = tmp_path / "out"
    base = ["screen", str(images), "-o", str(out), "--backbone", "classical", "--size", "42"]
    _fails([*base, "--registered"], capsys, "registered", "3D volumes only")
    _fails([*base, "--brain-mask", "nonzero", "--template", str(tmp_path)], capsys, "brain-mask, template", "2D images")
    _fails([*base, "--bias-correction", "n4"], capsys, "bias-correction apply to 3D volumes only")
    _fails([*base, "--hdbet-mode", "fast"], capsys, "hdbet-mode apply to 3D volumes only")
    vit = ["screen", str(images), "-o", str(out), "--weights", "random", "--size", "42"]  # the default ViT
    _fails([*vit, "--slices-per-block", "7"], capsys, "slices-per-block apply to 3D volumes only")
    fine = tmp_path / "vit7.yaml"  # the ViT's 7-voxel cubes (slices upsampled): volumes only
    fine.write_text("tokenizer: {patch: 7}\n", encoding="utf-8")
    _fails([*vit, "--config", str(fine)], capsys, "tokenizer patch apply to 3D volumes only")
    _nothing_written(out)


def test_preprocess_settings_come_before_its_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()  # not a previous preprocess output: refused too, but after the settings
    argv = ["preprocess", str(tmp_path / "no-scans"), "-o", str(tmp_path / "out")]
    _fails([*argv, "--size", "30"], capsys, "multiple of 14")
    _fails([*argv, "--workers", "0"], capsys, "--workers")
