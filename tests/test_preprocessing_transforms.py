"""MONAI: the volscan transforms inside Compose with LoadImaged, a Dataset/DataLoader, CacheDataset, inverse."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from test_preprocessing_data import reoriented, small_template

from preprocessing.intensity import learn_landmarks
from preprocessing.settings import PreprocessSettings
from preprocessing.io import save_volume
from preprocessing.transforms import HistogramStandardize, ToTemplateCubed, VolscanPreprocessd
from volumetric.errors import InputFileError, VolscanError

SIZE = 28


@pytest.fixture(scope="module")
def setup(sri24_dir, tmp_path_factory):
    """Template folder, landmarks file and three template-space scans stored in different voxel orders."""
    folder = tmp_path_factory.mktemp("monai")
    template = small_template(sri24_dir, folder / "template")
    items = []
    for i, (codes, scale) in enumerate((("RAS", 1.0), ("LPS", 5.0), ("PIR", 0.2))):
        image, affine = reoriented(template.brain * scale, template.image.affine, codes)
        label = np.zeros_like(image, dtype=np.uint8)
        label[tuple(s // 2 for s in label.shape)] = 1
        items.append({
            "image": str(save_volume(image, affine, folder / f"s{i}.nii.gz")),
            "label": str(save_volume(label, affine, folder / f"s{i}_label.nii.gz")),
        })
    landmarks = learn_landmarks([(template.brain, template.brain_mask)]).save(folder / "landmarks.npy")
    return folder / "template", landmarks, items


def _chain(template_dir, landmarks):
    return Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        VolscanPreprocessd(
            keys=["image", "label"],
            settings=PreprocessSettings(size=SIZE, registered=True, skull_stripped=True, landmarks=str(landmarks)),
            template=template_dir, mode=("bilinear", "nearest"),
        ),
    ])


def test_chain_runs_in_a_dataloader(setup):
    template_dir, landmarks, items = setup
    loader = DataLoader(Dataset(items, _chain(template_dir, landmarks)), batch_size=3, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == batch["brain_mask"].shape == batch["label"].shape == (3, 1, SIZE, SIZE, SIZE)
    images = batch["image"].numpy()
    # Same anatomy, three voxel orders and scanner scales: the same standardised cube.
    np.testing.assert_allclose(images[1], images[0], atol=1e-2)
    np.testing.assert_allclose(images[2], images[0], atol=1e-2)
    assert set(np.unique(batch["label"].numpy())) <= {0, 1} and batch["label"].sum() >= 1
    assert np.all(images[batch["brain_mask"].numpy() == 0] == 0)


def test_inverse_returns_to_the_input_grid(setup):
    template_dir, landmarks, items = setup
    chain = _chain(template_dir, landmarks)
    item = chain(items[2])
    native = chain.inverse(item)
    original = LoadImaged(keys=["label"])(items[2])["label"]
    assert native["label"].shape[1:] == original.shape
    np.testing.assert_allclose(native["label"].affine.numpy(), original.affine.numpy(), atol=1e-6)
    assert native["brain_mask"].shape[1:] == original.shape
    assert not native["image"].applied_operations


def test_cache_dataset_caches_our_step(setup):
    template_dir, landmarks, items = setup
    dataset = CacheDataset(items[:1], _chain(template_dir, landmarks), progress=False)
    assert "brain_mask" in dataset._cache[0]


def test_array_transform_returns_the_type_it_was_given(setup):
    template_dir, landmarks, items = setup
    transform = HistogramStandardize(landmarks)
    image = np.random.default_rng(0).random((1, 8, 8, 8)).astype(np.float32)
    mask = np.ones_like(image, dtype=bool)
    assert isinstance(transform(image, mask), np.ndarray)
    assert isinstance(transform(torch.as_tensor(image), mask), torch.Tensor)
    meta = transform(MetaTensor(torch.as_tensor(image), affine=torch.eye(4) * 2), mask)
    assert isinstance(meta, MetaTensor) and float(meta.affine[0, 0]) == 2.0


def test_plain_arrays_bad_modes_and_mismatched_grids_are_refused(setup):
    template_dir, landmarks, items = setup
    mixed = {"image": items[0]["image"], "label": items[1]["label"]}  # RAS image, LPS-stored label
    chain = _chain(template_dir, landmarks)
    loaded = Compose(chain.transforms[:2])(mixed)
    with pytest.raises(InputFileError, match="s1_label.nii.gz: its grid does not match"):
        chain.transforms[2](loaded)  # (inside Compose, MONAI wraps it in a RuntimeError)
    transform = ToTemplateCubed(keys="image", settings=PreprocessSettings(size=SIZE, registered=True), template=template_dir)
    with pytest.raises(VolscanError, match="MetaTensor"):
        transform({"image": np.zeros((1, 4, 4, 4), np.float32)})
    with pytest.raises(VolscanError, match="interpolation mode"):
        ToTemplateCubed(keys="image", settings=PreprocessSettings(size=SIZE), template=template_dir, mode="cubic")


def test_import_has_no_heavy_side_effects(tmp_path):
    code = (
        "import os, sys; os.environ['VOLSCAN_CACHE_DIR'] = sys.argv[1]; os.environ.pop('VOLSCAN_TEMPLATE', None);"
        "import preprocessing.transforms, preprocessing.cohort; print(sorted(os.listdir(sys.argv[1])))"
    )
    (tmp_path / "cache").mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
