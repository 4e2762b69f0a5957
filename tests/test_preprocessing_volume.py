"""One volume through the spatial chain: orientation invariance, masks, crop/resize, mapping both ways."""

from __future__ import annotations

import numpy as np
import pytest
from test_preprocessing_data import dice, known_affine, reoriented, small_template, warped_copy

from preprocessing.crop_resize import brain_crop_box, check_cube_size, crop_and_resize, cube_affine
from preprocessing.io import Volume, save_volume
from preprocessing.native_mapping import NativeMapping
from preprocessing.settings import PreprocessSettings
from preprocessing.volume import VolumePreprocessor
from volumetric.errors import InputFileError, VolscanError

SIZE = 28


@pytest.fixture(scope="module")
def template(sri24_dir, tmp_path_factory):
    return small_template(sri24_dir, tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def registered(template):
    return VolumePreprocessor(PreprocessSettings(size=SIZE, registered=True, brain_mask="template"), template)


@pytest.mark.parametrize("codes", ["LPS", "PIR"])
def test_same_image_in_other_voxel_orders_gives_same_cube(template, registered, codes):
    image, affine = template.image.array, template.image.affine
    reference = registered(Volume(image, affine))
    other = registered(Volume(*reoriented(image, affine, codes)))
    np.testing.assert_allclose(other.cube, reference.cube, atol=1e-3 * image.max())
    assert dice(other.brain_mask, reference.brain_mask) > 0.999


def test_orientation_invariance_through_registration(template):
    pre = VolumePreprocessor(PreprocessSettings(size=SIZE, brain_mask="template"), template)
    centre = template.image.affine @ np.r_[(np.array(template.image.array.shape) - 1) / 2, 1]
    image, _, affine = warped_copy(template, known_affine(centre=centre[:3]), codes="RAS")
    a = pre(Volume(image, affine))
    b = pre(Volume(*reoriented(image, affine, "PIR")))
    brain = a.brain_mask
    assert np.corrcoef(a.cube[brain], b.cube[brain])[0, 1] > 0.99
    assert dice(a.brain_mask, b.brain_mask) > 0.95
    assert dice(a.brain_mask, pre.template_cube_mask()) > 0.9


def test_crop_box_is_fixed_and_holds_the_brain(template):
    box = brain_crop_box(template.brain_mask, template.image.affine, margin_mm=4.0, cubic=True)
    np.testing.assert_allclose(box.extent, box.extent.max())
    tight = brain_crop_box(template.brain_mask, template.image.affine, margin_mm=4.0)
    assert np.all(tight.extent <= box.extent + 1e-6) and tight.extent.min() < box.extent.min()
    idx = np.argwhere(template.brain_mask)
    world = (template.image.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    assert np.all(world >= box.lower + 4.0 - 1e-6) and np.all(world <= box.upper - 4.0 + 1e-6)
    flat = brain_crop_box(template.brain_mask, template.image.affine, margin_mm=0.0, cubic=False)
    np.testing.assert_allclose(flat.lower, world.min(0) - 2.0)  # half a 4 mm voxel
    for size in (14, SIZE, 42):
        cube = crop_and_resize(template.image.array, template.image.affine, box, size)
        assert cube.shape == (size,) * 3 and cube.dtype == np.float32
        mask = crop_and_resize(template.brain_mask, template.image.affine, box, size, order=0)
        assert mask.dtype == bool and mask.any()
        np.testing.assert_allclose(np.diag(cube_affine(box, size))[:3], box.extent / size)


@pytest.mark.parametrize("size", [0, 30, 13, -14, True, 28.0])
def test_bad_cube_sizes(size):
    with pytest.raises(VolscanError, match="multiple of 14"):
        check_cube_size(size)


def test_mapping_round_trip_and_persistence(template, registered, tmp_path):
    image = template.image.array
    # A non-identity map so both directions matter (the input is rotated/scaled vs the template).
    world = known_affine((4.0, 3.0, -5.0), 1.05, (3.0, -2.0, 1.0), centre=(-120, 120, 77))
    mapping = NativeMapping(image.shape, template.image.affine, SIZE, registered.cube_affine, world)
    smooth = np.fromfunction(lambda x, y, z: np.sin(x / 9) + np.cos(y / 7) + z / 30, (SIZE,) * 3).astype(np.float32)
    native = mapping.to_native(smooth, order=1)
    assert native.shape == image.shape and native.dtype == np.float32
    again = mapping.to_cube(native, order=1)
    inner = np.zeros((SIZE,) * 3, bool)
    inner[6:-6, 6:-6, 6:-6] = True
    assert np.abs(again - smooth)[inner].max() < 0.15
    label = mapping.to_native(registered.template_cube_mask(), order=0)
    assert label.dtype == bool and dice(mapping.to_cube(label, order=0), registered.template_cube_mask()) > 0.9
    mapping.save(tmp_path / "m.json")
    loaded = NativeMapping.load(tmp_path / "m.json")
    np.testing.assert_array_equal(loaded.to_native(smooth), native)
    mapping.write_itk_transform(tmp_path / "m.tfm")
    assert "AffineTransform" in (tmp_path / "m.tfm").read_text(encoding="utf-8")
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InputFileError, match="not a volscan native mapping"):
        NativeMapping.load(tmp_path / "bad.json")
    with pytest.raises(VolscanError, match="shape"):
        mapping.to_native(np.zeros((3, 3, 3)))


def test_skull_stripped_input_uses_nonzero_mask(template):
    pre = VolumePreprocessor(PreprocessSettings(size=SIZE, registered=True, skull_stripped=True), template)
    result = pre(Volume(template.brain, template.image.affine))
    np.testing.assert_array_equal(result.brain_mask, result.mapping.to_cube(template.brain != 0, order=0))
    assert dice(result.brain_mask, pre.template_cube_mask()) > 0.99


def test_template_mask_refined_on_head_input(template, registered):
    result = registered(Volume(template.image.array, template.image.affine))
    assert dice(result.brain_mask, registered.template_cube_mask()) > 0.95
    assert not (result.brain_mask & ~registered.template_cube_mask()).any()


def test_empty_and_misplaced_inputs_are_refused(template, registered, tmp_path):
    zero = save_volume(np.zeros((10, 10, 10), np.float32), np.eye(4), tmp_path / "zero.nii.gz")
    with pytest.raises(InputFileError, match=f"^{zero}: has one constant intensity"):
        registered(zero)
    far = np.eye(4)
    far[:3, 3] = 5000.0
    elsewhere = save_volume(template.image.array, far, tmp_path / "far.nii.gz")
    pre = VolumePreprocessor(PreprocessSettings(size=SIZE, registered=True, skull_stripped=True), template)
    with pytest.raises(InputFileError, match=r"brain mask \(nonzero\) is empty.*template space"):
        pre(elsewhere)
