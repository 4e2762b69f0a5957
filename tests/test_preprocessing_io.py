"""Reading/writing volumes: orientation through affines, and one-line errors for bad files."""

from __future__ import annotations

import gzip
import locale

import nibabel as nib
import numpy as np
import pytest
from test_preprocessing_data import reoriented

from preprocessing.io import (
    Volume,
    check_same_grid,
    find_volumes,
    from_sitk,
    load_label,
    load_volume,
    save_volume,
    subject_id,
    to_sitk,
)
from volumetric.errors import InputFileError

RNG = np.random.default_rng(0)
AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.2, 0, 10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1.0]])


def _write(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_load_keeps_voxel_order_and_affine(tmp_path):
    data = RNG.random((5, 6, 7)).astype(np.float32)
    volume = load_volume(_write(tmp_path / "a.nii.gz", data))
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.affine, AFFINE)
    assert volume.array.dtype == np.float32 and volume.header is not None


def test_trailing_singleton_dimension_is_3d(tmp_path):
    data = RNG.random((5, 6, 7, 1)).astype(np.float32)
    assert load_volume(_write(tmp_path / "a.nii", data)).array.shape == (5, 6, 7)


def test_atlas_files_agree_in_world_coordinates(sri24_dir):
    """The two SRI-24 files store different voxel orders; their world geometry is the same."""
    head = load_volume(sri24_dir / "sri24_t1_brats.nii.gz")
    brain = load_volume(sri24_dir / "sri24_t1_brats_skullstripped.nii.gz")
    assert head.array.shape == brain.array.shape == (240, 240, 155)
    assert not np.allclose(head.affine, brain.affine)
    flipped, affine = reoriented(brain.array, brain.affine, "RAS")
    np.testing.assert_allclose(affine, head.affine)
    inside = flipped > 0
    np.testing.assert_array_equal(head.array[inside] != 0, np.ones(inside.sum(), bool))


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: _write(p / "four_d.nii.gz", np.zeros((4, 4, 4, 3), np.float32)), "is 4D"),
        (lambda p: _write(p / "two_d.nii.gz", np.ones((8, 8), np.float32)), "is 2D"),
        (lambda p: _write(p / "flat.nii.gz", np.ones((8, 8, 1), np.float32)), "is 2D"),
        (lambda p: _write(p / "nan.nii.gz", np.where(np.eye(4)[..., None] > 0, np.nan, 1).astype(np.float32) * np.ones((4, 4, 4), np.float32)), "NaN/Inf"),
        (lambda p: _write(p / "inf.nii.gz", np.full((4, 4, 4), np.inf, np.float32)), "NaN/Inf"),
        (lambda p: (p / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40)) and p / "corrupt.nii.gz", "not a readable NIfTI"),
        (lambda p: (p / "truncated.nii.gz").write_bytes(_write(p / "t.nii.gz", RNG.random((20, 20, 20)).astype(np.float32)).read_bytes()[:3000]) and p / "truncated.nii.gz", "not a readable NIfTI"),
        (lambda p: (p / "notes.txt").write_text("hello", encoding="utf-8") and p / "notes.txt", "not a NIfTI file"),
        (lambda p: p / "missing.nii.gz", "no such file"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputFileError) as info:
        load_volume(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_label_grid_must_match_image(tmp_path):
    image = load_volume(_write(tmp_path / "img.nii.gz", RNG.random((6, 6, 6)).astype(np.float32)))
    good = _write(tmp_path / "good.nii.gz", np.zeros((6, 6, 6), np.uint8))
    assert load_label(good, image).array.shape == (6, 6, 6)  # an all-zero label is a valid label
    shifted = AFFINE.copy()
    shifted[0, 3] += 3
    for name, data, affine in [("shape.nii.gz", np.zeros((6, 6, 5), np.uint8), AFFINE), ("moved.nii.gz", np.zeros((6, 6, 6), np.uint8), shifted)]:
        path = _write(tmp_path / name, data, affine)
        with pytest.raises(InputFileError, match=f"^{path}: label"):
            load_label(path, image)
    with pytest.raises(InputFileError, match="^label: label grid"):
        check_same_grid(Volume(np.zeros((2, 2, 2)), AFFINE), image)


def test_save_is_atomic_and_round_trips(tmp_path):
    data = RNG.random((4, 5, 6)).astype(np.float32)
    path = save_volume(data, AFFINE, tmp_path / "sub" / "out.nii.gz")
    back = load_volume(path)
    np.testing.assert_array_equal(back.array, data)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii.gz"]
    mask = save_volume(data > 0.5, AFFINE, tmp_path / "mask.nii.gz")
    assert nib.load(str(mask)).get_data_dtype() == np.uint8


@pytest.mark.parametrize("codes", ["LPS", "PIR", "ASL"])
def test_sitk_round_trip_preserves_world_positions(codes):
    data, affine = reoriented(RNG.random((5, 6, 7)).astype(np.float32), AFFINE, codes)
    image = to_sitk(data, affine)
    back, back_affine = from_sitk(image)
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_affine, affine, atol=1e-9)
    # ITK's LPS world = RAS world with x and y negated
    index = (1, 2, 3)
    ras = affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), [-ras[0], -ras[1], ras[2]])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
def test_saved_files_read_the_same_in_itk(tmp_path, codes):
    """What ITK-SNAP / 3D Slicer (ITK readers) see matches our affine."""
    import SimpleITK as sitk

    data, affine = reoriented(RNG.random((5, 6, 7)).astype(np.float32), AFFINE, codes)
    path = save_volume(data, affine, tmp_path / "x.nii.gz")
    itk = sitk.ReadImage(str(path))
    ours = to_sitk(data, affine)
    np.testing.assert_allclose(itk.GetOrigin(), ours.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(itk.GetDirection(), ours.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(itk.GetSpacing(), ours.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), sitk.GetArrayFromImage(ours))


def test_find_volumes_and_subject_ids(tmp_path):
    for name in ("b.nii.gz", "a.nii", "readme.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_volumes(tmp_path)] == ["a.nii", "b.nii.gz"]
    assert [subject_id(p) for p in find_volumes(tmp_path)] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no .nii/.nii.gz"):
        find_volumes(tmp_path / "empty")


def _write_dicom_series(folder, array, affine):
    """One 2D DICOM file per slice with the position/orientation tags GDCM sorts by."""
    import SimpleITK as sitk

    saved_locale = locale.setlocale(locale.LC_ALL, None)  # GDCM's writer switches it to "C"
    folder.mkdir()
    image = to_sitk(array, affine)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        plane.SetMetaData("0008|0060", "MR")
        plane.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.2")
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        plane.SetMetaData("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k))
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(plane)
    locale.setlocale(locale.LC_ALL, saved_locale)


def test_dicom_series_folder(tmp_path):
    data = RNG.integers(0, 1000, (6, 7, 5)).astype(np.int16)
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 20], [0, 1.2, 0, -5], [0, 0, 0, 1]])
    _write_dicom_series(tmp_path / "series", data, affine)
    encoding = locale.getpreferredencoding(False)
    volume = load_volume(tmp_path / "series")
    # GDCM switches the process locale to "C"; text IO must keep the user's encoding afterwards.
    assert locale.getpreferredencoding(False) == encoding
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, data.astype(np.float32))
    assert [p.name for p in find_volumes(tmp_path)] == ["series"]
    (tmp_path / "other").mkdir()
    with pytest.raises(InputFileError, match="no DICOM series"):
        load_volume(tmp_path / "other")
