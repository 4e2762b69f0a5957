"""`--export mood`: the MOOD challenge files read back by a scorer written here from the format's
description (MIC-DKFZ/mood `scripts/evalresults.py`: for every file name in the label folder,
the prediction of the same name; sample level `<input file name>.txt` holding one float,
pixel level a NIfTI of the input's name and shape; values clipped to [0, 1]; average precision
over all samples, or over every voxel of every scan at once).

The cohort is test_screen's (eight 32^3 volumes, three with a lesion and its mask).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from test_screen import screen_setup

from pipelines.cli import main


def _mood_labels(images: Path, masks: Path, folder: Path) -> None:
    """The MOOD label folders: `sample/<file>.txt` (0 or 1; named as the predictions, which
    `eval_dir` looks up by the label file's name) and `pixel/<file>` (the mask, or zeros for a
    scan without one)."""
    for kind in ("sample", "pixel"):
        (folder / kind).mkdir(parents=True)
    for image in sorted(images.iterdir()):
        mask_path = masks / image.name
        reference = nib.load(str(image))
        mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0 if mask_path.exists() else \
            np.zeros(reference.shape, dtype=bool)
        (folder / "sample" / f"{image.name}.txt").write_text(f"{int(mask.any())}\n", encoding="utf-8")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), reference.affine), str(folder / "pixel" / image.name))


def _mood_ap(predictions: Path, labels: Path, mode: str) -> float:
    """Average precision as MOOD's evaluation computes it (module docstring)."""
    truth, scores = [], []
    for label_file in sorted(labels.iterdir()):
        prediction = predictions / label_file.name
        if mode == "sample":
            truth.append([int(label_file.read_text(encoding="utf-8").splitlines()[0])])
            scores.append([np.clip(float(prediction.read_text(encoding="utf-8").splitlines()[0]), 0.0, 1.0)])
        else:
            label = np.rint(np.asarray(nib.load(str(label_file)).dataobj)).astype(int) == 1
            predicted = np.asarray(nib.load(str(prediction)).dataobj, dtype=np.float64)
            assert predicted.shape == label.shape  # MOOD refuses other shapes
            truth.append(label.ravel())
            scores.append(np.clip(predicted, 0.0, 1.0).ravel())
    return float(average_precision_score(np.concatenate(truth), np.concatenate(scores)))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    setup = screen_setup(tmp_path_factory.mktemp("mood"), tiny_vit_spec)
    out = setup["root"] / "run"
    assert main(["screen", *setup["base"], "--labels", str(setup["labels"]), "-o", str(out), "--export", "mood"]) == 0
    _mood_labels(setup["images"], setup["labels"], setup["root"] / "mood-labels")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {**setup, "out": out, "report": report, "mood_labels": setup["root"] / "mood-labels"}


def test_mood_sample_ap_equals_volscans_patient_ap(run: dict) -> None:
    files = sorted(p.name for p in (run["out"] / "mood" / "sample").iterdir())
    assert files == sorted(f"{p.name}.txt" for p in run["images"].iterdir())
    ap = _mood_ap(run["out"] / "mood" / "sample", run["mood_labels"] / "sample", "sample")
    assert ap == pytest.approx(run["report"]["metrics"]["patient_ap"], abs=1e-12)
    values = [float((run["out"] / "mood" / "sample" / f).read_text(encoding="utf-8")) for f in files]
    assert min(values) == 0.0 and max(values) == 1.0


def test_mood_pixel_maps_are_the_native_maps_on_one_scale(run: dict) -> None:
    """Pixel maps: the input's name and grid, values in [0, 1], one increasing map of the run's
    native maps for every scan, so the pooled pixel AP equals the AP of volscan's own maps."""
    out, native_scores, mood_scores, truth = run["out"], [], [], []
    for image in sorted(run["images"].iterdir()):
        sid = image.name.removesuffix(".nii.gz")
        mapped = nib.load(str(out / "mood" / "pixel" / image.name))
        assert mapped.shape == nib.load(str(image)).shape
        np.testing.assert_allclose(mapped.affine, nib.load(str(image)).affine)
        values = np.asarray(mapped.dataobj, dtype=np.float64)
        assert values.min() >= 0.0 and values.max() <= 1.0
        native = np.asarray(nib.load(str(out / "maps" / f"{sid}.nii.gz")).dataobj, dtype=np.float64)
        native_scores.append(native.ravel())
        mood_scores.append(values.ravel())
        label = np.rint(np.asarray(nib.load(str(run["mood_labels"] / "pixel" / image.name)).dataobj)) == 1
        truth.append(label.ravel())
    native_all, mood_all = np.concatenate(native_scores), np.concatenate(mood_scores)
    # One linear map for the whole run: mood = (native - low) / (high - low).
    slope, intercept = np.polyfit(native_all, mood_all, 1)
    np.testing.assert_allclose(mood_all, slope * native_all + intercept, atol=1e-6)
    assert slope > 0
    expected = average_precision_score(np.concatenate(truth), native_all)
    assert _mood_ap(out / "mood" / "pixel", run["mood_labels"] / "pixel", "pixel") == pytest.approx(expected, abs=1e-6)


def test_mood_export_refuses_2d_images_before_any_work(tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(folder / f"im{i}.png")
    assert main(["screen", str(folder), "-o", str(tmp_path / "out"), "--export", "mood", "--backbone", "classical",
                 "--size", "28", "--device", "cpu"]) == 2
    assert "--export mood needs 3D NIfTI volumes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
