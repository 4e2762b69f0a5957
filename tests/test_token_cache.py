"""TokenSet files and the token cache: round trips, keys, hits, misses, corruption, atomicity."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from volumetric.backbones import create_backbone
from volumetric.cache_keys import token_key
from volumetric.errors import InputFileError, VolscanError
from volumetric.token_cache import TokenCache
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


def _assert_same(a: TokenSet, b: TokenSet, rtol: float = 0.0) -> None:
    """Same tokens; `rtol` > 0 for a float16 cache entry (relative rounding <= 2^-11 per value)."""
    assert a.grid == b.grid and a.meta == b.meta and len(a.layers) == len(b.layers)
    assert torch.equal(a.void, b.void)
    for x, y in zip(a.layers, b.layers):
        assert y.dtype == torch.float32
        if rtol:
            torch.testing.assert_close(y, x, rtol=rtol, atol=0.0)
        else:
            assert torch.equal(x, y)


CACHED = 2.0**-11  # float16 storage: round to nearest, 11 significant bits


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


def test_invalid_key_is_refused(tmp_path):
    with pytest.raises(VolscanError, match="invalid token cache key"):
        TokenCache(tmp_path).path("../../etc/passwd")


def test_tokenizer_settings_key_the_cache(tokenizer):
    other = VolumeTokenizer(tokenizer.backbone, proj_dim=16, seed=1, progress=False)
    assert token_key("h", tokenizer.settings) != token_key("h", other.settings)
    assert token_key("h", tokenizer.settings) == token_key("h", VolumeTokenizer(
        tokenizer.backbone, proj_dim=16, progress=False).settings)
    # every setting that changes tokens changes the key: bf16 tokens differ slightly from fp32 ones
    keys = {token_key("h", VolumeTokenizer(tokenizer.backbone, proj_dim=16, progress=False, **change).settings)
            for change in (dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp32", final_norm=False),
                           dict(precision="fp32", slices_per_block=7))}
    assert len(keys) == 4


def test_miss_store_hit(tokens, tmp_path):
    cache = TokenCache(tmp_path / "cache")
    key = token_key("abc", SETTINGS)
    assert cache.load(key) is None
    path = cache.store(key, tokens)
    assert path == cache.path(key) and path.is_file()
    _assert_same(tokens, cache.load(key), CACHED)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_corrupt_entries_are_deleted_and_rebuilt(tokens, tmp_path, damage, caplog):
    cache = TokenCache(tmp_path)
    key = token_key("abc", SETTINGS)
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

    computed = cache.get_or_compute(key, compute)
    _assert_same(tokens, computed, CACHED)
    _assert_same(computed, cache.get_or_compute(key, compute))  # computed now = read later, exactly
    assert len(calls) == 1


def test_partial_write_is_invisible_and_version_mismatch_refused(tokens, tmp_path, monkeypatch):
    cache = TokenCache(tmp_path)
    key = token_key("abc", SETTINGS)
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


def test_float16_storage_halves_the_file_and_keeps_out_of_range_layers_exact(tokens, tmp_path):
    full = tokens.save(tmp_path / "full.safetensors")
    half = tokens.save(tmp_path / "half.safetensors", dtype=torch.float16)
    layer_bytes = sum(t.numel() for t in tokens.layers) * 4
    assert full.stat().st_size - half.stat().st_size >= 0.49 * layer_bytes
    _assert_same(tokens, TokenSet.load(half), CACHED)
    wide = torch.full((2, 3, 4), 70000.0)  # beyond float16's largest finite value (65504)
    nan = torch.full((2, 3, 4), float("nan"))
    small = torch.linspace(-1, 1, 24).reshape(2, 3, 4)
    mixed = TokenSet([wide, nan, small], torch.zeros(2, 3, dtype=torch.bool), (2, 3))
    loaded = TokenSet.load(mixed.save(tmp_path / "mixed.safetensors", dtype=torch.float16))
    assert torch.equal(loaded.layers[0], wide) and loaded.layers[1].isnan().all()
    assert not torch.equal(loaded.layers[2], small)  # stored in half precision...
    torch.testing.assert_close(loaded.layers[2], small, rtol=CACHED, atol=0.0)  # ...within its rounding
    with pytest.raises(VolscanError, match="float32 or float16"):
        tokens.save(tmp_path / "x.safetensors", dtype=torch.bfloat16)


def test_an_entry_read_under_another_key_is_discarded_or_refused(tokens, tmp_path, caplog):
    """Two scans' token files swapped: each checksums its own contents, so only the key in its
    header tells that it belongs to the other scan."""
    cache = TokenCache(tmp_path)
    other = TokenSet([t + 1 for t in tokens.layers], tokens.void, tokens.grid, tokens.meta)
    key_a, key_b = token_key("scan-a", SETTINGS), token_key("scan-b", SETTINGS)
    path_a, path_b = cache.store(key_a, tokens), cache.store(key_b, other)
    data_a, data_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(data_b)
    path_b.write_bytes(data_a)
    for key, path in ((key_a, path_a), (key_b, path_b)):
        with pytest.raises(InputFileError, match="written for another scan or settings") as refused:
            cache.load(key, discard=False)  # a reader that must not write: one error naming the file
        assert str(path) in str(refused.value) and path.is_file()
    with caplog.at_level(logging.WARNING, logger="volumetric.token_cache"):
        assert cache.load(key_a) is None
    assert f"{path_a}: token file was written for another scan" in caplog.text and "rebuilding" in caplog.text
    assert not path_a.exists()
    cache.store(key_a, tokens)  # what the caller does next: rebuild it
    _assert_same(tokens, cache.load(key_a), CACHED)
