"""Volume and image tokenizers with a tiny random timm ViT, against naive reference computations."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from volumetric.backbones import create_backbone
from volumetric.errors import VolscanError
from volumetric.projection import jl_matrix
from volumetric import tokens as tokens_module
from volumetric.prefetch import prefetch
from volumetric.tokens import (
    ImageTokenizer,
    TokenSettings,
    VolumeTokenizer,
    block_offsets,
    resolve_precision,
    unit_intensities,
)

R = 16  # projection width used in most tests


@pytest.fixture(scope="module")
def tiny(tiny_vit_spec):
    spec = dict(tiny_vit_spec)
    return create_backbone(spec.pop("name"), weights="random", random_seed=0, **spec)


def _volume(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, (size,) * 3).astype(np.float32)


def _naive_features(model: torch.nn.Module, image01: np.ndarray, layers: list[int]) -> list[np.ndarray]:
    """One (H, W) image in [0, 1] through the model on its own: per layer (C, h, w)."""
    cfg = model.pretrained_cfg
    x = torch.from_numpy(np.repeat(image01[None, None], 3, axis=1).astype(np.float32))
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        feats = model.forward_intermediates(x, indices=layers, intermediates_only=True, norm=True)
    return [f[0].numpy() for f in feats]


def test_grid_width_and_meta(tiny):
    tok = VolumeTokenizer(tiny, proj_dim=R, progress=False)
    for size, g in ((28, 2), (42, 3)):
        tokens = tok(_volume(size))
        assert tokens.grid == (g, g, g)
        assert len(tokens.layers) == 2
        for layer in tokens.layers:
            assert layer.shape == (g, g, g, 3 * R) and layer.dtype == torch.float32
        assert tokens.void.shape == (g, g, g) and tokens.void.dtype == torch.bool
    assert tokens.random_weights and tokens.meta["layers"] == [1, 2] and tokens.meta["size"] == 42


def test_pooling_equals_naive_per_block_mean_on_every_axis(tiny):
    # slice_batch 5 does not divide 14: batches straddle blocks, as they will on real data
    tok = VolumeTokenizer(tiny, proj_dim=R, slice_batch=5, precision="fp32", progress=False)
    unit = np.random.default_rng(1).random((28, 28, 28)).astype(np.float32)
    pooled = tok.pooled(torch.from_numpy(unit))
    for axis in range(3):
        slices = np.moveaxis(unit, axis, 0)
        per_slice = [_naive_features(tiny, s, tok.layers) for s in slices]
        for li in range(len(tok.layers)):
            stack = np.stack([f[li] for f in per_slice])  # (S, C, h, w)
            for block in range(2):
                expected = stack[14 * block:14 * (block + 1)].mean(0).transpose(1, 2, 0)  # (h, w, C)
                index = [slice(None)] * 3
                index[axis] = block
                got = pooled[li][axis][tuple(index)].numpy()
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_tokens_are_normalised_projected_pooled_features(tiny):
    tok = VolumeTokenizer(tiny, proj_dim=R, seed=3, precision="fp32", progress=False)
    volume = _volume(28, seed=2)
    tokens = tok(volume)
    unit = unit_intensities(torch.from_numpy(volume), torch.from_numpy(volume != 0))
    matrix = jl_matrix(48, R, 3).numpy()
    for li, feats in enumerate(tok.pooled(unit)):
        f = feats.numpy()
        unit = f / np.linalg.norm(f, axis=-1, keepdims=True)  # (3, g, g, g, C)
        expected = np.concatenate([unit[a] @ matrix for a in range(3)], -1)
        np.testing.assert_allclose(tokens.layers[li].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_projection_is_identical_across_processes_and_changes_with_seed():
    code = ("import hashlib; from volumetric.projection import jl_matrix; "
            "print(*(hashlib.sha256(jl_matrix(48, 16, s).numpy().tobytes()).hexdigest() for s in (7, 8)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = [hashlib.sha256(jl_matrix(48, 16, s).numpy().tobytes()).hexdigest() for s in (7, 8)]
    assert out == here
    assert here[0] != here[1]


def test_jl_matrix_distribution():
    m = jl_matrix(512, 256, 0)
    assert m.shape == (512, 256) and m.dtype == torch.float32
    assert abs(float(m.mean())) < 5 * (1 / 256) ** 0.5 / (512 * 256) ** 0.5  # 5 standard errors
    assert float(m.var()) == pytest.approx(1 / 256, rel=0.03)
    with pytest.raises(VolscanError, match="out_dim"):
        jl_matrix(48, 0, 0)


@pytest.mark.parametrize(("index", "thin_axis"), [((2, 0, 1), None), ((0, 2, 1), 0), ((2, 0, 1), 1), ((1, 2, 0), 2)])
def test_bright_cube_is_most_distinct_at_its_index_on_every_axis(tiny, index, thin_axis):
    # A bright object inside one 14^3 cube; with thin_axis it is a 3-voxel plate, so one axis
    # sees it in few slices and the other two in all of theirs: each axis's third of the token
    # must still single out the same grid index.
    volume = np.full((42, 42, 42), 0.5, np.float32)
    box = [slice(14 * i, 14 * i + 14) for i in index]
    if thin_axis is not None:
        box[thin_axis] = slice(14 * index[thin_axis] + 5, 14 * index[thin_axis] + 8)
    volume[tuple(box)] = 1.0
    # a fixed intensity map: a 3-voxel plate is under 1 % of the volume, below the percentiles
    tok = VolumeTokenizer(tiny, proj_dim=R, value_range=(0.0, 1.0), progress=False)
    tokens = tok(volume, np.ones(volume.shape, bool))
    for layer in tokens.layers:
        for part in [layer[..., a * R:(a + 1) * R] for a in range(3)] + [layer]:
            flat = part.reshape(27, -1)
            distinctness = torch.cdist(flat, flat).mean(1)
            assert np.unravel_index(int(distinctness.argmax()), (3, 3, 3)) == index


def test_jl_keeps_pairwise_distances_of_real_tokens(sri24_dir):
    from preprocessing.crop_resize import brain_crop_box, crop_and_resize
    from preprocessing.io import load_volume

    atlas = load_volume(sri24_dir / "sri24_t1_brats_skullstripped.nii.gz")
    cube = crop_and_resize(atlas.array, atlas.affine, brain_crop_box(atlas.array > 0, atlas.affine), 56)
    model = create_backbone("vit_small_patch14_dinov2", weights="random", depth=2, embed_dim=192, num_heads=3)
    r = 24
    tok = VolumeTokenizer(model, proj_dim=r, progress=False)
    tokens = tok(cube)
    unit = unit_intensities(torch.from_numpy(cube), torch.from_numpy(cube != 0))
    for li, feats in enumerate(tok.pooled(unit)):
        full = torch.cat(list(torch.nn.functional.normalize(feats, dim=-1)), -1).reshape(-1, 3 * 192).double()
        proj = tokens.layers[li].reshape(-1, 3 * r).double()
        pairs = torch.triu_indices(len(full), len(full), offset=1)
        d_full = torch.cdist(full, full)[pairs[0], pairs[1]]
        d_proj = torch.cdist(proj, proj)[pairs[0], pairs[1]]
        distinct = d_full > 1e-6  # background cubes outside the brain can coincide
        ratio = (d_proj[distinct] / d_full[distinct]) ** 2
        # Each squared ratio is a weighted mean of chi2(r)/r variables; the worst case (all weight
        # on one axis) is chi2(r)/r itself. Union bound over the pairs at a 1e-3 total level.
        tail = 1e-3 / (2 * len(ratio))
        low, high = chi2.ppf(tail, r) / r, chi2.ppf(1 - tail, r) / r
        assert len(ratio) > 1000
        assert low < float(ratio.min()) and float(ratio.max()) < high
        assert float(ratio.mean()) == pytest.approx(1.0, abs=0.15)


def test_void_mask_is_the_brain_fraction_per_cube(tiny):
    volume = _volume(28, seed=4)
    mask = np.zeros((28, 28, 28), bool)
    mask[:20, :, :] = True  # cubes along axis 0: block 0 full, block 1 holds 6/14 brain
    mask[:, :3, :] = False  # y-block 0 loses 3/14 more
    for fraction in (0.3, 0.5, 0.9):
        tokens = VolumeTokenizer(tiny, proj_dim=R, void_fraction=fraction, progress=False)(volume, mask)
        expected = np.array([[[mask[14 * i:14 * i + 14, 14 * j:14 * j + 14, 14 * k:14 * k + 14].mean() < fraction
                               for k in range(2)] for j in range(2)] for i in range(2)])
        np.testing.assert_array_equal(tokens.void.numpy(), expected)
    zero_outside = np.where(mask, volume, 0)
    by_default = VolumeTokenizer(tiny, proj_dim=R, progress=False)(zero_outside)
    with_mask = VolumeTokenizer(tiny, proj_dim=R, progress=False)(zero_outside, mask)
    assert torch.equal(by_default.void, with_mask.void)
    for a, b in zip(by_default.layers, with_mask.layers):
        assert torch.equal(a, b)


def test_unit_intensities_against_numpy():
    values = np.random.default_rng(5).normal(50, 10, (10, 12, 14)).astype(np.float32)
    region = values > 45
    lo, hi = np.percentile(values[region], [1, 99])
    expected = np.where(region, np.clip((values - lo) / (hi - lo), 0, 1), 0)
    got = unit_intensities(torch.from_numpy(values), torch.from_numpy(region))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    fixed = unit_intensities(torch.from_numpy(values), torch.from_numpy(region), value_range=(40, 60))
    np.testing.assert_allclose(fixed.numpy(), np.where(region, np.clip((values - 40) / 20, 0, 1), 0), atol=1e-6)
    with pytest.raises(VolscanError, match="percentiles"):
        unit_intensities(torch.from_numpy(values), torch.from_numpy(region), percentiles=(99, 1))
    # nearly uniform (a phantom): the percentiles coincide, so min..max sets the scale
    flat = np.full((10, 10, 10), 3.0, np.float32)
    flat[0, 0, :5] = 7.0
    got = unit_intensities(torch.from_numpy(flat), torch.ones(flat.shape, dtype=torch.bool)).numpy()
    np.testing.assert_allclose(got, (flat - 3.0) / 4.0)


def test_deterministic_seeded_and_input_untouched(tiny):
    volume = _volume(28, seed=6)
    before = volume.copy()
    a = VolumeTokenizer(tiny, proj_dim=R, seed=0, progress=False)(volume)
    b = VolumeTokenizer(tiny, proj_dim=R, seed=0, progress=False)(torch.from_numpy(volume))
    c = VolumeTokenizer(tiny, proj_dim=R, seed=1, progress=False)(volume)
    np.testing.assert_array_equal(volume, before)
    assert torch.equal(a.layers[0], b.layers[0]) and not torch.allclose(a.layers[0], c.layers[0])
    assert a.meta["projection"] == b.meta["projection"] != c.meta["projection"]


def test_bad_volumes_and_settings_raise_clear_errors(tiny):
    tok = VolumeTokenizer(tiny, proj_dim=R, progress=False)
    cases = [
        (np.zeros((28, 28, 42), np.float32) + 1, None, "cube"),
        (np.ones((30, 30, 30), np.float32), None, "multiple of the patch size 14"),
        (_volume(28), np.ones((28, 28, 14), bool), r"brain mask has shape"),
        (np.full((28, 28, 28), np.nan, np.float32), None, "NaN"),
        (np.zeros((28, 28, 28), np.float32), None, "no brain voxels"),
    ]
    for volume, mask, message in cases:
        with pytest.raises(VolscanError, match=message):
            tok(volume, mask)
    for kwargs, message in [(dict(proj_dim=0), "out_dim"), (dict(layers=[5]), "out of range"),
                            (dict(void_fraction=1.5), "void_fraction"), (dict(slice_batch=0), "slice_batch"),
                            (dict(precision="fp16"), "CUDA"), (dict(precision="half"), "precision must be"),
                            (dict(slices_per_block=15), "slices_per_block"), (dict(final_norm=1), "final_norm"), (dict(percentiles=(5, 5)), "percentiles"),
                            (dict(value_range=(1, 0)), "value_range"), (dict(percentiles=(1, 2, 3)), "pairs")]:
        with pytest.raises(VolscanError, match=message):
            VolumeTokenizer(tiny, **kwargs)


def test_image_tokens_match_a_single_naive_pass(tiny):
    tok = ImageTokenizer(tiny, proj_dim=R, seed=2, precision="fp32")
    image = np.random.default_rng(7).integers(0, 256, (42, 56), dtype=np.uint8)
    tokens = tok(image)
    assert tokens.grid == (3, 4) and not tokens.void.any()
    matrix = jl_matrix(48, R, 2).numpy()
    for li, feat in enumerate(_naive_features(tiny, image / 255.0, tok.layers)):
        f = feat.transpose(1, 2, 0)
        expected = (f / np.linalg.norm(f, axis=-1, keepdims=True)) @ matrix
        assert tokens.layers[li].shape == (3, 4, R)
        np.testing.assert_allclose(tokens.layers[li].numpy(), expected, rtol=1e-4, atol=1e-5)
    # Grey (an expanded view) and RGB (a permuted copy) reach the backbone in different memory
    # layouts, so the CPU may pick other kernels and summation orders: equal up to float rounding.
    rgb = tok(np.repeat(image[..., None], 3, axis=-1))
    as_float = tok(image.astype(np.float32) / 255.0)
    for a, b, c in zip(tokens.layers, rgb.layers, as_float.layers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_image_resize_policy_mask_and_errors(tiny):
    tok = ImageTokenizer(tiny, proj_dim=R)
    image = np.random.default_rng(8).random((50, 60, 3)).astype(np.float32)
    mask = np.zeros((50, 60), bool)
    mask[:, :30] = True
    tokens = tok(image, mask)
    assert tokens.grid == (4, 4)  # 50 -> 56, 60 -> 56: nearest multiples of 14
    assert tokens.meta["input_size"] == [50, 60] and tokens.meta["resized_to"] == [56, 56]
    np.testing.assert_array_equal(tokens.void.numpy(), np.tile([False, False, True, True], (4, 1)))
    with pytest.raises(VolscanError, match=r"\(H, W\) or \(H, W, 3\)"):
        tok(np.zeros((28, 28, 4), np.float32))
    with pytest.raises(VolscanError, match="image mask has shape"):
        tok(image, mask[:, :20])


def _naive_pooled(model: torch.nn.Module, unit: np.ndarray, layers: list[int], offsets: list[int]) -> list[np.ndarray]:
    """Per layer (3, g, g, g, C): every chosen slice through the model alone (blank ones too),
    averaged per block of 14, the sliced axis put back in place."""
    g = unit.shape[0] // 14
    out = [np.zeros((3, g, g, g, model.embed_dim)) for _ in layers]
    for axis in range(3):
        slices = np.moveaxis(unit, axis, 0)
        for block in range(g):
            feats = [_naive_features(model, slices[14 * block + o], layers) for o in offsets]
            for li in range(len(layers)):
                mean = np.mean([f[li] for f in feats], axis=0).transpose(1, 2, 0)  # (g, g, C)
                index = [axis, slice(None), slice(None), slice(None)]
                index[1 + axis] = block
                out[li][tuple(index)] = mean
    return out


def test_blank_slices_are_not_run_and_tokens_are_unchanged(tiny):
    # brain in a box: many whole slices on every axis hold no brain voxel (all zero)
    volume = np.zeros((28, 28, 28), np.float32)
    volume[3:20, 16:28, 9:25] = np.random.default_rng(9).normal(100, 20, (17, 12, 16))
    tok = VolumeTokenizer(tiny, proj_dim=R, slice_batch=7, precision="fp32", progress=False)
    unit = unit_intensities(torch.from_numpy(volume), torch.from_numpy(volume != 0))
    pooled = tok.pooled(unit)
    expected = _naive_pooled(tiny, unit.numpy(), tok.layers, list(range(14)))
    for got, want in zip(pooled, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    counts = tok.timer.totals()
    blank = (28 - 17) + (28 - 12) + (28 - 16)
    assert counts["skipped_slices"] == blank
    assert counts["slices"] == 3 * 28 - blank + 1  # + the one blank image run once
    # and the tokens (void and non-void cubes) equal the projected reference
    tokens = tok(volume)
    matrix = jl_matrix(48, R, 0).numpy()
    for layer, want in zip(tokens.layers, expected):
        unit_feats = want / np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(layer.numpy(), np.concatenate([unit_feats[a] @ matrix for a in range(3)], -1),
                                   rtol=1e-4, atol=1e-5)
    assert not tokens.void.all() and tokens.void.any()


def test_block_offsets_are_evenly_spaced():
    assert block_offsets(14, None) == list(range(14))
    assert block_offsets(14, 1) == [7]
    assert block_offsets(14, 2) == [3, 10]
    assert block_offsets(14, 4) == [1, 5, 8, 12]
    assert block_offsets(14, 7) == [1, 3, 5, 7, 9, 11, 13]
    assert block_offsets(14, 14) == list(range(14))
    for bad in (0, 15, 2.0, True):
        with pytest.raises(VolscanError, match="slices_per_block"):
            block_offsets(14, bad)


def test_slices_per_block_pools_only_the_chosen_slices(tiny):
    tok = VolumeTokenizer(tiny, proj_dim=R, slices_per_block=2, precision="fp32", progress=False)
    unit = np.random.default_rng(10).random((28, 28, 28)).astype(np.float32)
    pooled = tok.pooled(torch.from_numpy(unit))
    for got, want in zip(pooled, _naive_pooled(tiny, unit, tok.layers, [3, 10])):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    assert tok.timer.totals()["slices"] == 3 * 2 * 2  # 3 axes x 2 blocks x 2 slices
    full = VolumeTokenizer(tiny, proj_dim=R, precision="fp32", progress=False)
    assert tok.settings["slices_per_block"] == 2 and full.settings["slices_per_block"] is None


def _per_token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=1)


def test_bf16_tokens_agree_with_fp32(tiny_vit_spec):
    # DINOv2's LayerScale init (1e-5) leaves random blocks near the identity; at 1.0 every block
    # changes the tokens, so bf16 rounding in attention and MLPs is really exercised
    spec = dict(tiny_vit_spec)
    model = create_backbone(spec.pop("name"), weights="random", init_values=1.0, **spec)
    volume = _volume(42, seed=11)
    fp32 = VolumeTokenizer(model, proj_dim=R, precision="fp32", progress=False)
    bf16 = VolumeTokenizer(model, proj_dim=R, precision="bf16", progress=False)
    unit = unit_intensities(torch.from_numpy(volume), torch.ones(volume.shape, dtype=torch.bool))
    first, second = fp32.pooled(unit)
    assert float((first - second).norm() / first.norm()) > 0.01  # the block between the two layers counts
    a, b = fp32(volume), bf16(volume)
    assert a.meta["precision"] == "float32" and b.meta["precision"] == "bfloat16"
    for la, lb in zip(a.layers, b.layers):
        assert not torch.equal(la, lb)  # bf16 really ran
        assert float(_per_token_cosine(la, lb).min()) >= 0.999
    image = np.random.default_rng(12).random((42, 56)).astype(np.float32)
    for la, lb in zip(ImageTokenizer(model, proj_dim=R, precision="fp32")(image).layers,
                      ImageTokenizer(model, proj_dim=R, precision="bf16")(image).layers):
        assert float(_per_token_cosine(la, lb).min()) >= 0.999


def test_auto_precision_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(tokens_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(tokens_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16  # forced: honoured (with a warning)
    assert resolve_precision("fp32", cpu) == torch.float32


def test_final_norm_setting(tiny):
    x = torch.rand(1, 3, 28, 28)
    with torch.inference_mode():
        raw = tiny.forward_intermediates(x, indices=[1], intermediates_only=True, norm=False)[0]
        normed = tiny.forward_intermediates(x, indices=[1], intermediates_only=True, norm=True)[0]
        expected = tiny.norm(raw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(normed, expected)  # timm's norm=True is the final LayerNorm per token
    with_norm = VolumeTokenizer(tiny, proj_dim=R, layers=[1], precision="fp32", progress=False)
    without = VolumeTokenizer(tiny, proj_dim=R, layers=[1], precision="fp32", final_norm=False, progress=False)
    unit = x[0, 0].expand(28, 28, 28).contiguous()
    assert not torch.allclose(with_norm.pooled(unit)[0], without.pooled(unit)[0])
    assert with_norm.settings["final_norm"] and not without.settings["final_norm"]


def test_prepare_then_extract_equals_call_and_settings_build(tiny_vit_spec):
    spec = dict(tiny_vit_spec)
    settings = TokenSettings(backbone=spec.pop("name"), weights="random", backbone_kwargs=spec, proj_dim=R,
                             precision="fp32", device="cpu", slices_per_block=7)
    tok = settings.build("3d")
    assert isinstance(tok, VolumeTokenizer) and tok.slices_per_block == 7 and tok.dtype == torch.float32
    assert isinstance(settings.build("2d"), ImageTokenizer)
    volumes = [_volume(28, seed=s) for s in range(3)]
    direct = [tok(v) for v in volumes]
    via = [tok.extract(p) for p in prefetch([lambda v=v: tok.prepare(v) for v in volumes], depth=2)]
    for a, b in zip(direct, via):
        assert all(torch.equal(x, y) for x, y in zip(a.layers, b.layers)) and torch.equal(a.void, b.void)
    for bad, message in ((dict(precision="double"), "precision"), (dict(slices_per_block=0), "slices_per_block")):
        with pytest.raises(VolscanError, match=message):
            TokenSettings(**bad)
    with pytest.raises(VolscanError, match="kind"):
        settings.build("4d")


def test_prefetch_runs_ahead_in_order_and_reraises_at_the_failing_item():
    import threading

    started = [threading.Event() for _ in range(4)]

    def job(i: int):
        def run():
            started[i].set()
            if i == 2:
                raise VolscanError("job 2 failed")
            return i
        return run

    results = prefetch([job(i) for i in range(4)], depth=2)
    assert next(results) == 0
    # while the caller holds item 0, the next two jobs run in the background
    assert started[1].wait(5) and started[2].wait(5)
    assert next(results) == 1
    with pytest.raises(VolscanError, match="job 2 failed"):
        next(results)
    with pytest.raises(VolscanError, match="depth"):
        next(prefetch([], depth=0))


def test_cache_settings_tell_apart_models_built_with_other_options(tiny_vit_spec):
    """Two random models that differ only in a build option (init_values) give different tokens, so
    their cache settings must differ too (else a cache would serve one model's tokens for the other)."""
    spec = dict(tiny_vit_spec)
    name = spec.pop("name")
    volume = _volume(28)
    made = []
    for init_values in (1.0, 0.5):
        model = create_backbone(name, weights="random", random_seed=0, init_values=init_values, **spec)
        tok = VolumeTokenizer(model, layers=[0], proj_dim=R, seed=0, progress=False)
        made.append((tok.settings, tok(volume).layers[0]))
    (settings_a, tokens_a), (settings_b, tokens_b) = made
    assert not torch.allclose(tokens_a, tokens_b)
    assert settings_a != settings_b and settings_a["model_kwargs"] != settings_b["model_kwargs"]


def _upsample2_bilinear(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (2H, 2W): half-pixel-centred bilinear interpolation, edges clamped, written out."""
    def taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    (r0, r1, wr), (c0, c1, wc) = taps(image.shape[0]), taps(image.shape[1])
    rows = image[r0] * (1 - wr)[:, None] + image[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None] + rows[:, c1] * wc[None]


def test_fine_grid_pools_upsampled_slices_per_seven_slice_block(tiny):
    # 7-voxel cubes from a 14-pixel ViT: every slice enlarged 2x, blocks of 7 slices; the volume
    # has all-zero slices (skipped, one blank image stands in) and batches straddle blocks
    volume = np.zeros((14, 14, 14), np.float32)
    volume[2:12, 0:9, 4:14] = np.random.default_rng(11).normal(100, 20, (10, 9, 10))
    tok = VolumeTokenizer(tiny, proj_dim=R, slice_batch=4, precision="fp32", progress=False, patch=7)
    unit = unit_intensities(torch.from_numpy(volume), torch.from_numpy(volume != 0)).numpy()
    pooled = tok.pooled(torch.from_numpy(unit))
    assert pooled[0].shape == (3, 2, 2, 2, 48)
    for axis in range(3):
        slices = np.moveaxis(unit, axis, 0)
        per_slice = [_naive_features(tiny, _upsample2_bilinear(s), tok.layers) for s in slices]
        for li in range(len(tok.layers)):
            stack = np.stack([f[li] for f in per_slice])  # (14, C, 2, 2)
            for block in range(2):
                expected = stack[7 * block:7 * (block + 1)].mean(0).transpose(1, 2, 0)
                index = [slice(None)] * 3
                index[axis] = block
                np.testing.assert_allclose(pooled[li][axis][tuple(index)].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert tok.timer.totals()["skipped_slices"] == (14 - 10) + (14 - 9) + (14 - 10)


def test_fine_grid_is_twice_as_fine_with_its_void_and_settings(tiny):
    volume = _volume(28)
    mask = np.zeros((28, 28, 28), bool)
    mask[:10, 3:25, 5:28] = True
    coarse = VolumeTokenizer(tiny, proj_dim=R, progress=False)
    fine = VolumeTokenizer(tiny, proj_dim=R, progress=False, patch=7)
    tokens = fine(volume, mask)
    assert coarse(volume, mask).grid == (2, 2, 2) and tokens.grid == (4, 4, 4)
    assert all(layer.shape == (4, 4, 4, 3 * R) for layer in tokens.layers)
    fraction = mask.reshape(4, 7, 4, 7, 4, 7).mean(axis=(1, 3, 5))
    np.testing.assert_array_equal(tokens.void.numpy(), fraction < 0.5)
    assert tokens.void.any() and not tokens.void.all()
    assert tokens.meta["patch"] == 7 and fine.settings["patch"] == 7
    # the default grid's settings (and so its cache keys) carry no `patch`; 14 is the default grid
    assert "patch" not in coarse.settings
    assert VolumeTokenizer(tiny, proj_dim=R, progress=False, patch=14).settings == coarse.settings
    assert VolumeTokenizer(tiny, proj_dim=R, progress=False, slices_per_block=2, patch=7).offsets.tolist() == [1, 5]
    with pytest.raises(VolscanError, match="not a positive multiple of the patch size 7"):
        fine(_volume(30))


@pytest.mark.parametrize("bad", [5, 0, 28, 2, 1, 2.0, True])
def test_fine_grid_refuses_what_the_patch_cannot_reach(tiny, bad):
    with pytest.raises(VolscanError, match="patch") as err:
        VolumeTokenizer(tiny, proj_dim=R, progress=False, patch=bad)
    assert len(str(err.value).splitlines()) == 1


def test_fine_grid_settings_build_for_volumes_only(tiny_vit_spec):
    spec = dict(tiny_vit_spec)
    settings = TokenSettings(backbone=spec.pop("name"), weights="random", backbone_kwargs=spec, proj_dim=R,
                             device="cpu", patch=7)
    assert settings.build("3d").cube == 7
    with pytest.raises(VolscanError, match="3D volumes only"):
        settings.build("2d")
    with pytest.raises(VolscanError, match="positive integer"):
        TokenSettings(patch=-7)
