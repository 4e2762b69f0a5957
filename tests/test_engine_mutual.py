"""Mutual scoring against a plain per-collection `torch.cdist` loop, scale options, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from volumetric import devices
from volumetric.engine import CoDeGraph, EngineOptions, MutualDistances, mutual_scores
from volumetric.engine.partners import global_features, plan_pairs
from volumetric.engine.synthetic import synthetic_batch
from volumetric.errors import VolscanError


def reference_vectors(layers: list[torch.Tensor], valid: torch.Tensor, partners: torch.Tensor) -> list[list]:
    """Per (i, m): the list of (distance, collection) sorted ascending, float64, obvious loops."""
    n, m = valid.shape
    out = [[None] * m for _ in range(n)]
    for i in range(n):
        per_j = {}
        for j in range(n):
            if j == i or not partners[i, j]:
                continue
            d = sum(
                torch.cdist(
                    layer[i].double(), layer[j][valid[j]].double(), compute_mode="donot_use_mm_for_euclid_dist"
                ).amin(1)
                for layer in layers
            ) / len(layers)
            per_j[j] = d
        for e in range(m):
            if valid[i, e]:
                out[i][e] = sorted((float(d[e]), j) for j, d in per_j.items())
    return out


def reference_scores(layers, valid, top_fraction, partners=None, batch_size=None):
    n, m = valid.shape
    partners = ~torch.eye(n, dtype=torch.bool) if partners is None else partners
    batch_size = [n] * n if batch_size is None else batch_size.tolist()
    vectors = reference_vectors(layers, valid, partners)
    scores = torch.full((n, m), math.nan, dtype=torch.float64)
    for i in range(n):
        k = max(1, math.floor(top_fraction * (batch_size[i] - 1)))
        for e in range(m):
            if valid[i, e]:
                scores[i, e] = sum(d for d, _ in vectors[i][e][:k]) / k
    return scores


def random_batch(n, m, c, seed, void=0.0, layers=1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, m, c + 2 * i, generator=g) for i in range(layers)]
    valid = torch.rand(n, m, generator=g) >= void
    valid[torch.arange(n), torch.randint(m, (n,), generator=g)] = True
    return feats, valid


def assert_scores_match(actual, expected):
    assert actual.dtype == torch.float32
    assert torch.equal(actual.isnan(), expected.isnan())
    ok = ~expected.isnan()
    torch.testing.assert_close(actual[ok].double(), expected[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n, m, c, void, fraction, layers",
    [(2, 5, 3, 0.0, 0.1, 1), (5, 7, 4, 0.3, 0.5, 1), (7, 13, 9, 0.4, 0.3, 2), (9, 11, 33, 0.0, 1.0, 3)],
)
def test_scores_equal_cdist_reference(n, m, c, void, fraction, layers):
    feats, valid = random_batch(n, m, c, seed=n * 100 + m, void=void, layers=layers)
    expected = reference_scores(feats, valid, fraction)
    assert_scores_match(mutual_scores(feats, fraction, valid if void else None), expected)


def test_tiny_blocks_give_the_same_result():
    feats, valid = random_batch(6, 40, 8, seed=3, void=0.25)
    full = mutual_scores(feats, 0.4, valid, return_vectors=True)
    # 0.0005 MiB = 131 floats: forces row blocks of a few elements and one collection per block.
    tiny = mutual_scores(feats, 0.4, valid, return_vectors=True, options=EngineOptions(block_mb=0.0005))
    torch.testing.assert_close(tiny.scores, full.scores, equal_nan=True)
    torch.testing.assert_close(tiny.sorted_distances, full.sorted_distances, equal_nan=True)
    assert torch.equal(tiny.nearest, full.nearest)


def test_vectors_collections_and_nearest_elements():
    feats, valid = random_batch(5, 9, 6, seed=11, void=0.3)
    result = mutual_scores(feats, 0.25, valid, return_vectors=True)
    assert isinstance(result, MutualDistances)
    assert result.sorted_distances.shape == (5, 9, 4) and result.collections.dtype == torch.int64
    assert result.nearest.dtype == torch.int64
    vectors = reference_vectors(feats, valid, ~torch.eye(5, dtype=torch.bool))
    x = feats[0]
    for i in range(5):
        for e in range(9):
            if not valid[i, e]:
                assert result.sorted_distances[i, e].isnan().all() and (result.collections[i, e] == -1).all()
                continue
            expected = torch.tensor([d for d, _ in vectors[i][e]], dtype=torch.float64)
            torch.testing.assert_close(result.sorted_distances[i, e].double(), expected, rtol=1e-5, atol=1e-6)
            for rank in range(4):
                j, pos = int(result.collections[i, e, rank]), int(result.nearest[i, e, rank])
                assert j != i and valid[j, pos]
                assert abs(float((x[i, e] - x[j, pos]).norm()) - float(result.sorted_distances[i, e, rank])) < 1e-5
    assert torch.equal(result.top_k, torch.ones(5, dtype=torch.int64))


def test_layers_average_distances_and_have_no_nearest():
    feats, valid = random_batch(4, 6, 5, seed=5, layers=2)
    result = mutual_scores(feats, 1.0, valid, return_vectors=True)
    assert result.nearest is None
    assert_scores_match(result.scores, reference_scores(feats, valid, 1.0))


def test_invalid_elements_are_never_neighbours():
    feats, valid = random_batch(4, 10, 5, seed=7, void=0.4)
    changed = [f.clone() for f in feats]
    changed[0][~valid] = 1e-3  # void tokens placed right next to each other
    before = mutual_scores(feats, 0.5, valid)
    after = mutual_scores(changed, 0.5, valid)
    torch.testing.assert_close(after, before, equal_nan=True)


def test_subsets_score_each_subset_alone():
    feats, valid = random_batch(10, 8, 4, seed=9, void=0.2)
    plan = plan_pairs(10, subsets=3, seed=4)
    expected = reference_scores(feats, valid, 0.5, plan.partners, plan.batch_size)
    result = mutual_scores(feats, 0.5, valid, options=EngineOptions(subsets=3, seed=4), return_vectors=True)
    assert_scores_match(result.scores, expected)
    assert sorted(plan.batch_size.tolist()) == [3] * 6 + [4] * 4
    # entries of other subsets were never computed
    assert (result.collections[valid] == -1).any()


def test_preselection_keeps_the_most_similar_collections():
    feats, valid = random_batch(9, 6, 5, seed=13, void=0.2)
    full = mutual_scores(feats, 0.3, valid)
    everyone = mutual_scores(feats, 0.3, valid, options=EngineOptions(preselect_fraction=1.0))
    torch.testing.assert_close(everyone, full, equal_nan=True)
    globals_ = global_features(feats, valid)
    plan = plan_pairs(9, preselect_fraction=0.5, globals_=globals_, min_partners=2)
    assert torch.equal(plan.partners, plan.partners.T) and not plan.partners.diagonal().any()
    similarity = globals_ @ globals_.T
    for i in range(9):
        kept = plan.partners[i].nonzero().flatten()
        best = similarity[i].masked_fill(torch.eye(9, dtype=torch.bool)[i], -2).topk(4).indices
        assert set(best.tolist()) <= set(kept.tolist())
    result = mutual_scores(feats, 0.3, valid, options=EngineOptions(preselect_fraction=0.5))
    assert_scores_match(result, reference_scores(feats, valid, 0.3, plan.partners))
    assert bool((result[valid] >= full[valid] - 1e-6).all())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(4, 5), None), "rank 3"),
        (lambda: ([torch.randn(4, 5, 3), torch.randn(4, 6, 3)], None), "does not match"),
        (lambda: (torch.randn(1, 5, 3), None), "at least N = 2"),
        (lambda: (torch.tensor([[[math.nan]], [[1.0]]]), None), "NaN or Inf"),
        (lambda: (torch.tensor([[[math.inf]], [[1.0]]]), None), "NaN or Inf"),
        (lambda: (torch.randn(3, 4, 2), torch.tensor([[True] * 4, [False] * 4, [True] * 4])), "no valid element"),
        (lambda: (torch.randn(3, 4, 2), torch.ones(3, 5, dtype=torch.bool)), "expected shape"),
        (lambda: (torch.randn(3, 4, 2), torch.ones(3, 4)), "torch.bool"),
        (lambda: (torch.randint(3, (3, 4, 2)), None), "floating-point"),
        (lambda: ([], None), "non-empty"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    features, valid = make()
    with pytest.raises(VolscanError, match=message) as caught:
        mutual_scores(features, 0.1, valid)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: dict(top_fraction=0.0), "top_fraction"),
        (lambda: dict(top_fraction=1.5), "top_fraction"),
        (lambda: dict(options=EngineOptions(subsets=3)), "fewer than 2 per subset"),
        (lambda: dict(options=EngineOptions(preselect_fraction=0.0)), "preselect_fraction"),
        (
            lambda: dict(options=EngineOptions(preselect_fraction=0.5), global_features=torch.randn(3, 4)),
            "global_features",
        ),
        (lambda: dict(options=EngineOptions(device="cuda:99")), "device"),
        (lambda: dict(options=EngineOptions(device="nonsense")), "device"),
        (lambda: dict(options=EngineOptions(precision="fp8")), "precision"),
        (lambda: dict(options=EngineOptions(block_mb=0)), "block_mb"),
        (lambda: dict(options=EngineOptions(subsets=0)), "subsets"),
        (lambda: dict(options=EngineOptions(memory_mb=-1)), "memory_mb"),
    ],
)
def test_bad_options_are_refused(make, message):
    with pytest.raises(VolscanError, match=message) as caught:
        mutual_scores(torch.randn(5, 4, 3), **make())
    assert "\n" not in str(caught.value)


def test_very_uneven_collections_are_padded_correctly():
    feats, _ = random_batch(5, 12, 6, seed=17)
    valid = torch.zeros(5, 12, dtype=torch.bool)
    valid[0] = True  # the widest collection sets the padded width
    valid[1, 3] = valid[2, [0, 11]] = valid[3, ::2] = valid[4, 5:9] = True
    expected = reference_scores(feats, valid, 0.5)
    for block_mb in (256.0, 0.0002):  # one block, and row/collection chunks of a few elements
        result = mutual_scores(feats, 0.5, valid, return_vectors=True, options=EngineOptions(block_mb=block_mb))
        assert_scores_match(result.scores, expected)
        nearest = result.nearest[valid]
        assert bool(((nearest == -1) | valid[result.collections[valid].clamp_min(0), nearest.clamp_min(0)]).all())


def test_bf16_is_close_to_fp32():
    feats, valid = random_batch(8, 60, 48, seed=21, void=0.3)
    exact = mutual_scores(feats, 0.3, valid)
    approx = mutual_scores(feats, 0.3, valid, options=EngineOptions(precision="bf16"))
    assert torch.equal(approx.isnan(), exact.isnan())
    relative = ((approx[valid] - exact[valid]).abs() / exact[valid]).max()
    assert 0 < relative < 2e-3  # reduced precision really used, and still close


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(caplog):
    feats, valid = random_batch(5, 9, 6, seed=23, void=0.2)
    with caplog.at_level("WARNING"):
        fallback = mutual_scores(feats, 0.3, valid, options=EngineOptions(device="cpu", precision="fp16"))
    assert "fp16 needs CUDA" in caplog.text
    exact = mutual_scores(feats, 0.3, valid, options=EngineOptions(device="cpu"))
    torch.testing.assert_close(fallback, exact, rtol=0, atol=0, equal_nan=True)


def test_bf16_without_native_support_warns(monkeypatch, caplog, tmp_path):
    native = tmp_path / "native"
    native.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n", encoding="utf-8")
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags : fpu avx2 avx512f\n", encoding="utf-8")
    assert devices.cpu_has_native_bf16(str(native)) and not devices.cpu_has_native_bf16(str(plain))
    assert not devices.cpu_has_native_bf16(str(tmp_path / "missing"))
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert devices.effective_precision("bf16", torch.device("cpu")) == "bf16"
    assert "slower than fp32" in caplog.text


def test_bf16_keeps_codegraph_outliers_and_exclusions():
    batch = synthetic_batch(m=96, per_collection=10, seed=0)
    exact = CoDeGraph()(batch.features, options=EngineOptions(progress=False))
    approx = CoDeGraph()(batch.features, options=EngineOptions(precision="bf16", progress=False))
    flagged = [[r.communities[c] for c in r.outlier_communities] for r in (exact, approx)]
    assert flagged[0] == flagged[1] == [batch.consistent]
    assert float((approx.excluded == exact.excluded).float().mean()) >= 0.99
    top = max(1, round(0.01 * exact.scores.numel()))
    tops = [set(r.scores.flatten().topk(top).indices.tolist()) for r in (exact, approx)]
    same = tops[0] & tops[1]
    assert len(same) >= 0.99 * top


def test_huge_finite_values_are_not_mistaken_for_inf():
    # their float32 sum (6e38) overflows, so the element-wise check must clear them; and the
    # engine's own mean and norms must not overflow either
    feats = torch.full((3, 10, 2), 1e37)
    feats[:, :, 1] = torch.linspace(0.0, 1e37, 30).view(3, 10)
    assert not torch.isfinite(feats.sum())
    scores = mutual_scores(feats, 0.5, options=EngineOptions(progress=False))
    expected = reference_scores([feats.double()], torch.ones(3, 10, dtype=torch.bool), 0.5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0)
