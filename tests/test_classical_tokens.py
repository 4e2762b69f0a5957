"""Classical (weights-free) tokens: grid and void as the ViT path, numerics against numpy, detection of a blob."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from volumetric.classical_tokens import (
    BATCH_STANDARDIZE,
    CLASSICAL_BACKBONE,
    REFERENCE_SCALE,
    ClassicalTokenizer,
    needs_batch_standardize,
    robust_standardize,
    standardize_batch,
)
from volumetric.engine import lnamd, score_collections
from volumetric.errors import VolscanError

S = 42  # a 3^3 token grid


def _head(seed: int, size: int = S, blob: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A textured ball (scanner-like scale, noise), optionally with a bright blob centred at voxel `blob`."""
    rng = np.random.default_rng(seed)
    axis = np.arange(size) - (size - 1) / 2
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    brain = x ** 2 + y ** 2 + z ** 2 < (0.48 * size) ** 2
    texture = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), 1.5)
    volume = 400.0 + 40.0 * texture / texture.std() + 8.0 * rng.standard_normal((size,) * 3)
    if blob is not None:
        ball = ((x - axis[blob[0]]) ** 2 + (y - axis[blob[1]]) ** 2 + (z - axis[blob[2]]) ** 2) < 5.0 ** 2
        volume[ball] = 900.0
    return np.where(brain, volume, 0.0).astype(np.float32), brain


def test_grid_void_and_widths_match_the_vit_contract():
    volume, brain = _head(0)
    tokenizer = ClassicalTokenizer()
    tokens = tokenizer(volume, brain)
    assert tokens.grid == (3, 3, 3) and len(tokens.layers) == 2
    assert [t.shape[-1] for t in tokens.layers] == [len(n) for n in tokenizer.feature_names]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tokens.layers)
    # Void: a cube is void when less than half its voxels are brain (numpy reference, cube by cube).
    expected = np.zeros((3, 3, 3), bool)
    for i, j, k in np.ndindex(3, 3, 3):
        expected[i, j, k] = brain[14 * i:14 * i + 14, 14 * j:14 * j + 14, 14 * k:14 * k + 14].mean() < 0.5
    assert np.array_equal(tokens.void.numpy(), expected) and expected.any() and not expected.all()
    assert tokens.meta[BATCH_STANDARDIZE] and tokens.meta["backbone"] == CLASSICAL_BACKBONE
    assert not tokens.random_weights and needs_batch_standardize([tokens])


def test_deterministic_and_input_untouched(tmp_path):
    volume, brain = _head(1)
    before = volume.copy()
    first, second = ClassicalTokenizer()(volume, brain), ClassicalTokenizer()(volume, brain)
    assert np.array_equal(volume, before)
    assert all(torch.equal(a, b) for a, b in zip(first.layers, second.layers))
    # The same TokenSet file format and cache contract as ViT tokens.
    loaded = type(first).load(first.save(tmp_path / "t.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(first.layers, loaded.layers)) and loaded.meta == first.meta
    assert ClassicalTokenizer(scales=(1.0, 3.0)).settings != ClassicalTokenizer().settings


def test_intensity_statistics_match_a_plain_numpy_reference():
    volume, brain = _head(2)
    tokens = ClassicalTokenizer()(volume, brain)
    names = ClassicalTokenizer().feature_names[0]
    inside = volume[brain].astype(np.float64)
    q25, median, q75 = np.percentile(inside, [25, 50, 75])
    unit = (np.where(brain, volume, 0.0) - median) / (q75 - q25)
    np.testing.assert_allclose(robust_standardize(volume, brain), unit, rtol=1e-5, atol=1e-5)
    smooth = ndimage.gaussian_filter(unit, 1.0, mode="reflect")
    for i, j, k in np.ndindex(3, 3, 3):
        cell = (slice(14 * i, 14 * i + 14), slice(14 * j, 14 * j + 14), slice(14 * k, 14 * k + 14))
        region = brain[cell]
        if not region.any():
            continue
        values, blurred = unit[cell][region], smooth[cell][region]
        token = tokens.layers[0][i, j, k].numpy()
        np.testing.assert_allclose(token[names.index("intensity mean")], values.mean(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(token[names.index("intensity std")], values.std(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(token[names.index("gauss1 max")], blurred.max(), rtol=1e-4, atol=1e-4)


def test_standardize_batch_uses_valid_tokens_only():
    rng = np.random.default_rng(3)
    layer = torch.from_numpy(rng.normal(5.0, 3.0, (4, 3, 3, 3, 6)).astype(np.float32))
    layer[..., 5] = 2.0  # a constant channel is centred, not blown up
    valid = torch.from_numpy(rng.random((4, 3, 3, 3)) > 0.3)
    layer[~valid] = 1e6  # void tokens must not move the statistics
    (out,) = standardize_batch([layer], valid)
    inside = layer[valid].double().numpy()
    expected = (inside - inside.mean(0)) / np.where(inside.std(0) > 1e-6, inside.std(0), 1.0)
    np.testing.assert_allclose(out[valid][:, :6].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.shape == layer.shape[:-1] + (8,) and torch.all(out[valid][:, 5] == 0)
    # The constant reference that keeps token lengths through the engine's L2 normalisation: a pair
    # of opposite channels (length REFERENCE_SCALE sqrt(D), zero sum: no weight in LayerNorm's mean).
    torch.testing.assert_close(out[..., 6], torch.full(out.shape[:-1], REFERENCE_SCALE * 3 ** 0.5))
    assert torch.equal(out[..., 7], -out[..., 6])
    with pytest.raises(VolscanError):
        standardize_batch([layer], torch.zeros_like(valid))


def test_reference_channel_keeps_token_length_through_the_engine_aggregation():
    """Two tokens with one profile, one three times as far from the batch's typical value, stay apart
    after the engine's LNAMD (which L2-normalises every token), as they are in plain Euclidean terms."""
    rng = np.random.default_rng(5)
    valid = torch.ones(3, 3, 3, 3, dtype=torch.bool)
    (out,) = standardize_batch([torch.from_numpy(rng.normal(size=(3, 3, 3, 3, 8)).astype(np.float32))], valid)
    out[0, 1, 1, 1, :-2] = 3 * out[0, 0, 0, 0, :-2]
    aggregated = lnamd(out, 1, valid)
    gap = torch.linalg.norm(aggregated[0, 1, 1, 1] - aggregated[0, 0, 0, 0])
    typical = torch.linalg.norm(aggregated[1:, 0, 0, 0] - aggregated[1:, 1, 1, 1], dim=-1).median()
    assert gap > 0.5 * typical


def test_bright_and_dark_tokens_end_equally_far_from_a_typical_one():
    """A token +1.5 sd in every channel and one -1.5 sd (a bright and a dark lesion's profile) sit at
    the same Euclidean distance from the batch's typical token; after LNAMD (LayerNorm over the
    map, then L2) they must stay equally far. A reference channel inside LayerNorm's mean shifts
    every channel by about c / (D + 1) and made the bright one 21 % farther."""
    rng = np.random.default_rng(6)
    d = 24
    valid = torch.ones(4, 4, 4, 4, dtype=torch.bool)
    raw = torch.from_numpy(rng.normal(size=(4, 4, 4, 4, d)).astype(np.float32))
    (out,) = standardize_batch([raw], valid)
    out[0, 0, 0, 0, :d] = 0.0  # the typical token
    out[0, 1, 1, 1, :d] = 1.5
    out[0, 2, 2, 2, :d] = -1.5
    aggregated = lnamd(out, 1, valid)
    bright = torch.linalg.norm(aggregated[0, 1, 1, 1] - aggregated[0, 0, 0, 0])
    dark = torch.linalg.norm(aggregated[0, 2, 2, 2] - aggregated[0, 0, 0, 0])
    assert float(bright / dark) == pytest.approx(1.0, abs=0.02)


def test_a_bright_blob_is_the_most_anomalous_token():
    """Four healthy heads and one with a bright blob in cube (1, 1, 2): MuSc on standardised classical
    tokens puts the blob's cube on top, and the blob's cube differs from the same cube in healthy heads."""
    tokenizer = ClassicalTokenizer()
    sets = [tokenizer(*_head(10 + i)) for i in range(4)] + [tokenizer(*_head(20, blob=(21, 21, 35)))]
    valid = ~torch.stack([t.void for t in sets])
    raw = [torch.stack([t.layers[i] for t in sets]) for i in range(2)]
    layers = standardize_batch(raw, valid)
    healthy_spread = torch.cdist(layers[0][:4, 1, 1, 2], layers[0][:4, 1, 1, 2]).max()
    assert torch.linalg.norm(layers[0][4, 1, 1, 2] - layers[0][:4, 1, 1, 2], dim=-1).min() > 2 * healthy_spread
    result = score_collections(layers, valid, method="musc")
    scores = torch.nan_to_num(torch.as_tensor(result.element_scores), nan=-1.0)
    assert np.unravel_index(int(scores.argmax()), scores.shape) == (4, 1, 1, 2)
    assert int(torch.as_tensor(result.collection_scores).argmax()) == 4


def test_images_2d_gray_colour_and_mask():
    rng = np.random.default_rng(4)
    gray = rng.random((56, 84)).astype(np.float32)
    tokenizer = ClassicalTokenizer()
    tokens = tokenizer(gray)
    assert tokens.grid == (4, 6) and not tokens.void.any()
    colour = tokenizer(np.stack([gray, gray * 0.5, 1 - gray], axis=-1))
    assert [t.shape[-1] for t in colour.layers] == [3 * t.shape[-1] for t in tokens.layers]
    mask = np.zeros((56, 84), bool)
    mask[:28, :42] = True
    assert int((~tokenizer(gray, mask).void).sum()) == 2 * 3


@pytest.mark.parametrize("bad, message", [
    (np.zeros((42, 42, 28), np.float32), "cube"),
    (np.ones((30, 30, 30), np.float32), "multiple"),
    (np.full((28, 28, 28), np.nan, np.float32), "NaN"),
    (np.zeros((28, 28, 28), np.float32), "no brain"),
    (np.ones((50, 56), np.float32), "multiples"),
])
def test_bad_inputs_are_one_line_errors(bad, message):
    with pytest.raises(VolscanError, match=message):
        ClassicalTokenizer()(bad)


@pytest.mark.parametrize("kwargs", [dict(scales=()), dict(scales=(2.0, 1.0)), dict(scales=(0.0,)),
                                    dict(void_fraction=1.5), dict(patch=1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(VolscanError):
        ClassicalTokenizer(**kwargs)
