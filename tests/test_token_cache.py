"""TokenSet files and the token cache: round trips, keys, hits, misses, corruption, atomicity."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from volumetric.backbones import create_backbone
from volumetric.errors import InputFileError, VolscanError
from volumetric.token_cache import TokenCache, content_hash
from volumetric.token_set import TokenSet
from volumetric.tokens import VolumeTokenizer

SETTINGS = {"backbone": "vit_small_patch14_dinov2", "weights": "random:0", "layers": [1, 2], "proj_dim": 16,
            "seed": 0, "size": 28, "void_fraction": 0.5}


@pytest.fixture(scope="module")
def tokenizer(tiny_vit_spec):
    spec = dict(tiny_vit_spec)
    model = create_backbone(spec.pop("name"), weights="random", **spec)
    return VolumeTokenizer(model, proj_dim=16, progress=False)


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).normal(100, 20, (28, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def tokens(tokenizer, volume):
    return tokenizer(volume)


def _assert_same(a: TokenSet, b: TokenSet) -> None:
    assert a.grid == b.grid and a.meta == b.meta and len(a.layers) == len(b.layers)
    assert torch.equal(a.void, b.void)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x, y)


def test_token_set_round_trip_and_validation(tokens, tmp_path):
    path = tokens.save(tmp_path / "sub" / "t.safetensors")
    loaded = TokenSet.load(path)
    _assert_same(tokens, loaded)
    assert loaded.random_weights
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary left behind
    with pytest.raises(VolscanError, match="expected grid"):
        TokenSet([torch.zeros(2, 2, 3)], torch.zeros(2, 3, dtype=torch.bool), (2, 3))
    with pytest.raises(VolscanError, match="void must be a bool"):
        TokenSet([torch.zeros(2, 3, 4)], torch.zeros(2, 3), (2, 3))
    with pytest.raises(VolscanError, match="JSON"):
        TokenSet([torch.zeros(2, 3, 4)], torch.zeros(2, 3, dtype=torch.bool), (2, 3), {"x": object()}).save(
            tmp_path / "bad.safetensors")


def test_failed_write_leaves_nothing(tokens, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tokens.save(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_content_hash_of_files_and_arrays(tmp_path, volume):
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
    with pytest.raises(VolscanError, match="missing.nii.gz: cannot read"):
        content_hash(tmp_path / "missing.nii.gz")


def test_key_depends_on_input_and_every_setting(tmp_path):
    cache = TokenCache(tmp_path)
    base = cache.key("abc", SETTINGS)
    assert base == cache.key("abc", dict(reversed(list(SETTINGS.items()))))
    assert base != cache.key("abd", SETTINGS)
    changed = {"backbone": "vit_large_patch14_dinov2", "weights": "file:00", "layers": [2, 1], "proj_dim": 32,
               "seed": 1, "size": 56, "void_fraction": 0.25}
    for name, value in changed.items():
        assert cache.key("abc", dict(SETTINGS, **{name: value})) != base, name
    with pytest.raises(VolscanError, match="JSON"):
        cache.key("abc", {"x": object()})
    with pytest.raises(VolscanError, match="invalid token cache key"):
        cache.path("../../etc/passwd")


def test_tokenizer_settings_key_the_cache(tokenizer, tmp_path):
    cache = TokenCache(tmp_path)
    other = VolumeTokenizer(tokenizer.backbone, proj_dim=16, seed=1, progress=False)
    assert cache.key("h", tokenizer.settings) != cache.key("h", other.settings)
    assert cache.key("h", tokenizer.settings) == cache.key("h", VolumeTokenizer(
        tokenizer.backbone, proj_dim=16, progress=False).settings)
    # every setting that changes tokens changes the key: bf16 tokens differ slightly from fp32 ones
    keys = {cache.key("h", VolumeTokenizer(tokenizer.backbone, proj_dim=16, progress=False, **change).settings)
            for change in (dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp32", final_norm=False),
                           dict(precision="fp32", slices_per_block=7))}
    assert len(keys) == 4


def test_miss_store_hit(tokens, tmp_path):
    cache = TokenCache(tmp_path / "cache")
    key = cache.key("abc", SETTINGS)
    assert cache.load(key) is None
    path = cache.store(key, tokens)
    assert path == cache.path(key) and path.is_file()
    _assert_same(tokens, cache.load(key))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_corrupt_entries_are_deleted_and_rebuilt(tokens, tmp_path, damage, caplog):
    cache = TokenCache(tmp_path)
    key = cache.key("abc", SETTINGS)
    path = cache.store(key, tokens)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the last tensor's values: only the checksum notices
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "empty":
        data = bytearray()
    else:
        data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="volumetric.token_cache"):
        assert cache.load(key) is None
    assert "corrupt token cache entry" in caplog.text and path.name in caplog.text
    assert not path.exists()
    calls = []

    def compute() -> TokenSet:
        calls.append(1)
        return tokens

    _assert_same(tokens, cache.get_or_compute(key, compute))
    _assert_same(tokens, cache.get_or_compute(key, compute))
    assert len(calls) == 1


def test_partial_write_is_invisible_and_version_mismatch_refused(tokens, tmp_path, monkeypatch):
    cache = TokenCache(tmp_path)
    key = cache.key("abc", SETTINGS)
    final = cache.path(key)
    final.parent.mkdir(parents=True)
    # what an interrupted TokenSet.save leaves: only a temporary next to the final name
    (final.parent / f".{final.name}.x1y2.tmp").write_bytes(b"half a file")
    assert cache.load(key) is None
    path = cache.store(key, tokens)
    import volumetric.token_set as token_set

    monkeypatch.setattr(token_set, "TOKEN_FORMAT_VERSION", token_set.TOKEN_FORMAT_VERSION + 1)
    with pytest.raises(InputFileError, match="token format version"):
        TokenSet.load(path)


def test_cache_root_must_be_a_folder(tmp_path):
    file = tmp_path / "f"
    file.write_text("x", encoding="utf-8")
    with pytest.raises(VolscanError, match="not a folder"):
        TokenCache(file)
