"""Cache keys and the content hashes they are made of (`volumetric.cache_keys`, `volumetric.hashing`).

`test_keys_are_the_released_ones` pins every key to the value volscan computed before the keys
moved into one module (main at 737fcf2): a key that changes for the same input and settings
silently makes every user's cache recompute, so a change there must be a deliberate version bump.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from preprocessing.intensity import Landmarks
from preprocessing.settings import PreprocessSettings
from preprocessing.template import find_template_folder, resolve_template, template_files
from volumetric.cache_keys import (
    keyed_token_settings,
    landmarks_key,
    model_input_hash,
    preprocess_store,
    scan_key,
    standardised_key,
    store_name,
    token_file,
    token_key,
    tokens_root,
)
from volumetric.classical_tokens import ClassicalTokenizer
from volumetric.errors import InputFileError, VolscanError
from volumetric.hashing import content_fingerprint, content_hash, content_size, digest

SETTINGS = {"backbone": "vit_small_patch14_dinov2", "weights": "random:0", "layers": [1, 2], "proj_dim": 16,
            "seed": 0, "size": 28, "void_fraction": 0.5}


@pytest.fixture()
def inputs(tmp_path):
    """A fixed single-file input and a fixed two-file DICOM-like series folder."""
    scan = tmp_path / "a.nii"
    scan.write_bytes(bytes(range(256)) * 4)
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    (series / "2.dcm").write_bytes(b"two")
    return scan, series


def test_keys_are_the_released_ones(inputs, tmp_path):
    # Main's key values at 737fcf2 (computed there with preprocessing.store.content_hash/digest,
    # cohort._cohort_key/_final_key, stages.preprocess.cohort_folder's digest and
    # stages.tokens.token_key). They must not change: existing caches are found by them.
    scan, series = inputs
    assert content_hash(scan) == "785b0751fc2c53dc14a4ce3d800e69ef9ce1009eb327ccf458afe09c242c26c9"
    assert content_hash(series) == "298315b0a8b450097e70dd056648c5ab87b6aaa2bf31f75465906c243cb36145"
    assert content_fingerprint(scan) == "bfabb2b0be3cc7da92153f6ddd62bba2"
    assert digest({"b": [1, 2.5, None], "a": "x"}) == "b649bb117135db06f8230f303b8eee17"
    assert digest({"id": "a", "format": "volscan-preprocess-record/2", "spatial_key": "k"}, 64) == \
        "78a1652ef2790da0cfce93df207d8b3003535fe9c83f277611793575acce3e48"
    # the bundled SRI-24 template, as every 3D key sees it
    template = resolve_template(None)
    assert template.identity == "72ae60193cbac5aa"
    files = template_files(find_template_folder(None))
    # spatial keys: default settings (N4 applies), registered + skull-stripped inputs, an HD-BET mask
    assert scan_key(scan, PreprocessSettings().spatial_key(template.identity, "template")) == \
        "72999e3d88c2d87edec498e2d20efefc"
    assert scan_key(scan, PreprocessSettings(registered=True, skull_stripped=True).spatial_key(
        template.identity, "template")) == "89129a71c981c4ec0329faca4d7a0cec"
    # HD-BET's key changed once on purpose (main's was ae22ad626d046b4692fe53a933f9819e): its masks
    # changed (`cache_keys.HDBET_MASK_REVISION`), so stores holding the older masks are not reused.
    assert scan_key(scan, PreprocessSettings().spatial_key(template.identity, "hd-bet")) == \
        "c49dbcfed1cb5bc20f61ff998eb7bebd"
    landmarks = Landmarks(np.linspace(0, 100, 13))
    assert landmarks.digest == "6b642246609e3411"
    assert landmarks_key([("b", "2" * 32), ("a", "1" * 32)], (0.01, 0.99)) == "5a2043ab8ce944a776cef46d3ba06e0b"
    assert standardised_key("1" * 32, landmarks.digest) == "68d68def0460a13d841cc9da119d12d7"
    # preprocessing store names: 3D without and with N4, 2D
    cohort = [("b", series), ("a", scan)]
    assert store_name(cohort, 112, files, None) == "5623a736b11252e6db6131fa"
    n4 = PreprocessSettings(bias_correction="n4").n4.key()
    assert store_name(cohort, 112, files, n4) == "0d36d8519a2b76c2fac82906"
    assert store_name([("a", scan)], 224, None, None) == "c70b3c9ca30e0a9cb7f60be0"
    # token keys: a model input with and without a brain mask; the classical tokenizer's settings
    array = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    mask = array > 100
    vit = {"backbone": "vit_small_patch14_dinov2.lvd142m", "weights": "random:0", "layers": [1, 2], "proj_dim": 16,
           "size": 112}
    assert token_key(model_input_hash(array, mask), vit) == \
        "7f5e6514aad00a19926734843b135275f7db894810627f5c0b0e8f6f2db30c84"
    assert token_key(model_input_hash(array, None), vit) == \
        "28e3db0d70c9aa66c55e18b3ac01dbf292f7ece1bb243850be9cc0b776d2bf1a"
    classical = keyed_token_settings(ClassicalTokenizer().settings, 112)
    assert token_key(model_input_hash(array, mask), classical) == \
        "e3ca8ef0e4717f859ee1e30f024b900ea1e4494e8c719715806024ccadc5adf6"
    assert token_key("abc", {"x": 1}) == "52653a6ba246baa584794e152d8d98fd15e55716619b5e9876966291d0d4ac89"
    # locations
    key = token_key("abc", {"x": 1})
    assert token_file(tokens_root(tmp_path), key) == tmp_path / "tokens" / "52" / f"{key}.safetensors"
    assert preprocess_store(tmp_path, "5623a736b11252e6db6131fa") == tmp_path / "preprocess" / "5623a736b11252e6db6131fa"


def test_content_hash_of_files_and_arrays(tmp_path):
    volume = np.random.default_rng(0).normal(100, 20, (28, 28, 28)).astype(np.float32)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"volume bytes")
    b.write_bytes(b"volume bytes")
    assert content_hash(a) == content_hash(str(b))
    b.write_bytes(b"volume bytez")
    assert content_hash(a) != content_hash(b)
    assert content_hash(volume) == content_hash(torch.from_numpy(volume.copy()))
    assert content_hash(volume) != content_hash(volume.astype(np.float64))
    assert content_hash(volume) != content_hash(volume.reshape(28, 784))
    changed = volume.copy()
    changed[3, 4, 5] += 1
    assert content_hash(volume) != content_hash(changed)
    with pytest.raises(InputFileError, match="missing.nii.gz: no such file"):
        content_hash(tmp_path / "missing.nii.gz")


def test_content_hash_and_fingerprint_follow_content_not_path(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.bytes(3 << 20)  # beyond the fingerprint's 16 sampled 64 KiB blocks
    a, b = tmp_path / "a.nii.gz", tmp_path / "elsewhere" / "b.nii.gz"
    b.parent.mkdir()
    a.write_bytes(big)
    b.write_bytes(big)
    assert content_hash(a) == content_hash(b) and content_fingerprint(a) == content_fingerprint(b)
    assert content_size(a) == len(big)
    changed = bytearray(big)
    changed[-1] ^= 1  # e.g. a gzip trailer's CRC: the last block is always sampled
    b.write_bytes(bytes(changed))
    assert content_hash(a) != content_hash(b) and content_fingerprint(a) != content_fingerprint(b)
    series = tmp_path / "series"  # a DICOM series folder: every file, sorted by name
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    (series / "2.dcm").write_bytes(b"two")
    assert content_size(series) == 6 and len(content_hash(series)) == 64
    before = content_hash(series)
    (series / "2.dcm").write_bytes(b"TWO!")  # another size: remembered hashes are not reused
    assert content_hash(series) != before


def test_token_key_depends_on_input_and_every_setting():
    base = token_key("abc", SETTINGS)
    assert base == token_key("abc", dict(reversed(list(SETTINGS.items()))))
    assert base != token_key("abd", SETTINGS)
    changed = {"backbone": "vit_large_patch14_dinov2", "weights": "file:00", "layers": [2, 1], "proj_dim": 32,
               "seed": 1, "size": 56, "void_fraction": 0.25, "patch": 7}
    for name, value in changed.items():
        assert token_key("abc", dict(SETTINGS, **{name: value})) != base, name
    with pytest.raises(VolscanError, match="JSON"):
        token_key("abc", {"x": object()})


def test_model_input_hash_follows_the_mask():
    array = np.zeros((8, 8, 8), np.float32)
    mask = np.ones((8, 8, 8), bool)
    assert model_input_hash(array, mask) != model_input_hash(array, None)
    assert model_input_hash(array, mask) != model_input_hash(array, ~mask)
    assert model_input_hash(array, mask) == model_input_hash(array.copy(), mask.copy())


def test_hashing_and_keys_import_no_torch():
    code = ("import sys, volumetric.cache_keys, volumetric.hashing, preprocessing.store; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
