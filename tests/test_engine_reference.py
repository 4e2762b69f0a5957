"""Reference scoring (query collections against a base) against plain float64 numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from volumetric.engine import CoDeGraph, EngineOptions, ScoringConfig, score_collections
from volumetric.engine.reference import reference_mutual_scores, score_against_reference
from volumetric.errors import VolscanError

QUIET = EngineOptions(progress=False)


def brute_score(own, i, e, partners, k, squared):
    """float64 mean of the k smallest `d(x, J)` of element e of collection i of `own` (layers)
    over `partners`: (layers, (N, M) mask, j) per partner collection (plain loops)."""
    distances = []
    for layers, mask, j in partners:
        per_layer = [min(np.sqrt(((mine[i, e] - layer[j, y]) ** 2).sum()) for y in range(mask.shape[1]) if mask[j, y])
                     for mine, layer in zip(own, layers)]
        distances.append(sum(per_layer) / len(per_layer))
    return np.sort(np.asarray(distances) ** (2 if squared else 1))[:k].mean()


def brute_force(query, base, query_valid, base_valid, fraction, independent, squared=False):
    """(q, M) float64: plain loops over elements, collections and layers (numpy, no shortcut)."""
    q_layers = [np.asarray(t, dtype=np.float64) for t in query]
    b_layers = [np.asarray(t, dtype=np.float64) for t in base]
    q, m = query_valid.shape
    n = base_valid.shape[0]
    k = max(1, math.floor(fraction * ((n + 1 if independent else n + q) - 1)))
    out = np.full((q, m), np.nan)
    for i in range(q):
        partners = [(b_layers, base_valid, j) for j in range(n) if base_valid[j].any()]
        if not independent:
            partners += [(q_layers, query_valid, j) for j in range(q) if j != i]
        for e in range(m):
            if query_valid[i, e]:
                out[i, e] = brute_score(q_layers, i, e, partners, k, squared)
    return out


def batch(q, n, m, c, seed, void=0.3, layers=2):
    g = torch.Generator().manual_seed(seed)
    query = [torch.randn(q, m, c + l, generator=g) for l in range(layers)]
    base = [torch.randn(n, m, c + l, generator=g) for l in range(layers)]
    query_valid = torch.rand(q, m, generator=g) >= void
    base_valid = torch.rand(n, m, generator=g) >= void
    query_valid[:, 0] = True
    base_valid[:, 0] = True
    return query, base, query_valid, base_valid


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("q, n, fraction", [(1, 6, 0.3), (3, 7, 0.3), (4, 9, 1.0)])
def test_scores_equal_brute_force(q, n, fraction, independent):
    query, base, query_valid, base_valid = batch(q, n, 15, 5, seed=q * 10 + n)
    got = reference_mutual_scores(query, base, fraction, query_valid, base_valid, independent=independent,
                                  options=QUIET)
    expected = brute_force(query, base, query_valid.numpy(), base_valid.numpy(), fraction, independent)
    assert got.dtype == torch.float32
    assert np.array_equal(np.isnan(got.numpy()), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(got.numpy()[ok], expected[ok], rtol=1e-5, atol=1e-6)


def test_excluded_base_elements_and_emptied_collections_are_nobodys_neighbour():
    query, base, query_valid, base_valid = batch(2, 6, 15, 4, seed=5)
    neighbours = base_valid.clone()
    neighbours[1, :8] = False
    neighbours[4] = False  # every element of collection 4 excluded
    got = reference_mutual_scores(query, base, 0.5, query_valid, neighbours, squared=True, options=QUIET)
    expected = brute_force(query, base, query_valid.numpy(), neighbours.numpy(), 0.5, False, squared=True)
    # k counts the emptied collection as part of the batch (as the full run did), its distance as missing
    assert math.floor(0.5 * (6 + 2 - 1)) == 3
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(got.numpy()[ok], expected[ok], rtol=1e-5, atol=1e-6)


def test_independent_score_is_the_same_alone_or_with_others():
    query, base, query_valid, base_valid = batch(5, 8, 30, 6, seed=11)
    together = reference_mutual_scores(query, base, 0.3, query_valid, base_valid, independent=True, options=QUIET)
    for i in range(5):
        alone = reference_mutual_scores([t[i : i + 1] for t in query], base, 0.3, query_valid[i : i + 1], base_valid,
                                        independent=True, options=QUIET)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6, equal_nan=True)
    dependent = reference_mutual_scores(query, base, 0.3, query_valid, base_valid, options=QUIET)
    assert not torch.allclose(dependent.nan_to_num(0.0), together.nan_to_num(0.0))  # the option changes something


def test_bf16_is_close_to_fp32_with_exact_peaks():
    query, base, query_valid, base_valid = batch(3, 10, 64, 24, seed=2, layers=1)
    fp32 = reference_mutual_scores(query, base, 0.3, query_valid, base_valid, options=QUIET)
    bf16 = reference_mutual_scores(query, base, 0.3, query_valid, base_valid,
                                   options=EngineOptions(progress=False, precision="bf16"))
    ok = ~fp32.isnan()
    assert float(((bf16[ok] - fp32[ok]).abs() / fp32[ok]).max()) < 2e-3
    peaks = fp32.nan_to_num(-1.0).argmax(1)
    rows = torch.arange(3)
    torch.testing.assert_close(bf16[rows, peaks], fp32[rows, peaks], rtol=1e-5, atol=1e-6)


def grids(q, n, seed):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(q + n, 4, 4, 4, 6, generator=g) for _ in range(2)]
    valid = torch.rand(q + n, 4, 4, 4, generator=g) >= 0.25
    valid[:, 0, 0, 0] = True
    return layers, valid


@pytest.mark.parametrize("q", [1, 3])
def test_queries_score_as_in_the_full_batch_musc(q):
    """With MuSc, a query's score against base + the other queries is its score in the full batch."""
    n = 7
    layers, valid = grids(q, n, seed=q)
    config = ScoringConfig(lnamd_radii=(1, 3), engine=QUIET)
    full = score_collections(layers, valid, method="musc", config=config)
    got = score_against_reference([t[n:] for t in layers], [t[:n] for t in layers], valid[n:], valid[:n], "musc",
                                  config, independent=q == 1)
    torch.testing.assert_close(got.element_scores, full.element_scores[n:], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got.collection_scores, full.collection_scores[n:], rtol=1e-5, atol=1e-6)


def test_codegraph_with_nothing_excluded_equals_the_full_batch():
    n = 8
    layers, valid = grids(2, n, seed=9)
    config = ScoringConfig(lnamd_radii=(1, 3), engine=QUIET, codegraph=CoDeGraph(top_fraction=0.25))
    full = score_collections(layers, valid, method="codegraph", config=config)
    assert not bool(full.codegraph.excluded.any())  # random features: no outlier community
    got = score_against_reference([t[n:] for t in layers], [t[:n] for t in layers], valid[n:], valid[:n],
                                  "codegraph", config, excluded=torch.zeros_like(valid[:n]))
    torch.testing.assert_close(got.element_scores, full.element_scores[n:], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_unsupported_settings_are_one_line_errors():
    layers, valid = grids(1, 4, seed=0)
    for config in (ScoringConfig(engine=EngineOptions(window=1)), ScoringConfig(rscin=(1, 2)),
                   ScoringConfig(engine=EngineOptions(subsets=2))):
        with pytest.raises(VolscanError, match="reference scoring"):
            score_against_reference([t[4:] for t in layers], [t[:4] for t in layers], valid[4:], valid[:4], "musc",
                                    config)
    with pytest.raises(VolscanError, match="does not match base"):
        reference_mutual_scores(torch.zeros(1, 5, 3), torch.zeros(3, 5, 4), 0.3)


@pytest.mark.parametrize("nearest", [False, True])
def test_collection_minima_reduces_only_the_scored_collections(nearest):
    from volumetric.engine.distances import collection_minima

    query, base, query_valid, base_valid = batch(3, 6, 40, 5, seed=4, layers=1)
    layers = [torch.cat([query[0], base[0]])]
    valid = torch.cat([query_valid, base_valid])
    small = EngineOptions(progress=False, block_mb=0.01)  # many blocks, some straddling the scored prefix
    full = collection_minima(layers, valid, nearest=nearest, options=small)
    part = collection_minima(layers, valid, nearest=nearest, options=small, scored=3)
    rows = full.owner < 3
    assert torch.equal(part.distances[rows], full.distances[rows])
    assert bool(torch.isinf(part.distances[~rows][:, 3:]).all())  # unscored rows were not reduced
    if nearest:
        assert torch.equal(part.nearest[rows], full.nearest[rows])


def brute_base_scores(query, base, query_valid, neighbours, scored, fraction, squared=False):
    """(N, M) float64 base scores in a full batch of base + queries: neighbours of a base element
    are the other base collections' `neighbours` and every query element (plain loops)."""
    q_layers = [np.asarray(t, dtype=np.float64) for t in query]
    b_layers = [np.asarray(t, dtype=np.float64) for t in base]
    n, m = scored.shape
    q = query_valid.shape[0]
    k = max(1, math.floor(fraction * (n + q - 1)))
    out = np.full((n, m), np.nan)
    for i in range(n):
        partners = [(b_layers, neighbours, j) for j in range(n) if j != i and neighbours[j].any()]
        partners += [(q_layers, query_valid, j) for j in range(q)]
        for e in range(m):
            if scored[i, e]:
                out[i, e] = brute_score(b_layers, i, e, partners, k, squared)
    return out


@pytest.mark.parametrize("squared", [False, True])
def test_update_scores_base_and_queries_as_the_union_brute_force(squared):
    """Base elements (excluded ones too) and queries scored as a full batch of the union would."""
    from volumetric.engine.ranked import ranked_minima
    from volumetric.engine.reference import kept_count, reference_mutual_update

    query, base, query_valid, base_valid = batch(3, 7, 15, 4, seed=21, layers=1)
    neighbours = base_valid.clone()
    neighbours[2, :9] = False  # some excluded elements
    neighbours[5] = False  # a collection with every element excluded
    keep = kept_count(7, 0.5)
    kept = ranked_minima(base[0], base_valid, keep, base=neighbours, options=QUIET).distances
    got_query, got_base = reference_mutual_update(query, base, 0.5, kept, query_valid, neighbours,
                                                  base_scored=base_valid, squared=squared, options=QUIET)
    expected_base = brute_base_scores(query, base, query_valid.numpy(), neighbours.numpy(), base_valid.numpy(), 0.5,
                                      squared)
    expected_query = brute_force(query, base, query_valid.numpy(), neighbours.numpy(), 0.5, False, squared)
    for got, expected in ((got_base, expected_base), (got_query, expected_query)):
        assert np.array_equal(np.isnan(got.numpy()), np.isnan(expected))
        ok = ~np.isnan(expected)
        np.testing.assert_allclose(got.numpy()[ok], expected[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", [(5, 5), (4, 4, 4)])
@pytest.mark.parametrize("method", ["musc", "codegraph"])
def test_reference_and_new_scores_equal_a_full_screen_of_the_union(grid, method):
    """A reference batch scored with kept minima, then q new collections against it: every
    score (reference and new) equals the full batch of the union's (2D and 3D)."""
    n, q = 9, 3
    g = torch.Generator().manual_seed(len(grid) + len(method))
    layers = [torch.randn(n + q, *grid, 6, generator=g) for _ in range(2)]
    valid = torch.rand(n + q, *grid, generator=g) >= 0.25
    valid.view(n + q, -1)[:, 0] = True
    config = ScoringConfig(lnamd_radii=(1, 3), engine=QUIET, codegraph=CoDeGraph(top_fraction=0.25))
    from volumetric.engine.reference import kept_count

    f = config.musc_top_fraction if method == "musc" else config.codegraph.top_fraction
    reference = score_collections([t[:n] for t in layers], valid[:n], method=method, config=config,
                                  keep_minima=kept_count(n, f))
    plain = score_collections([t[:n] for t in layers], valid[:n], method=method, config=config)
    assert torch.equal(reference.element_scores.nan_to_num(-1), plain.element_scores.nan_to_num(-1))  # unchanged
    assert len(reference.kept_minima) == 4 and reference.kept_minima[0].shape == (int(valid[:n].sum()), kept_count(n, f))
    full = score_collections(layers, valid, method=method, config=config)
    if method == "codegraph":
        assert not bool(full.codegraph.excluded.any()) and not bool(reference.codegraph.excluded.any())
    got = score_against_reference([t[n:] for t in layers], [t[:n] for t in layers], valid[n:], valid[:n], method,
                                  config, excluded=None if method == "musc" else torch.zeros_like(valid[:n]),
                                  base_minima=reference.kept_minima)
    torch.testing.assert_close(got.element_scores, full.element_scores[n:], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got.collection_scores, full.collection_scores[n:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.reference_scores, full.collection_scores[:n], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.reference_scores, plain.collection_scores)  # the update changed them


def test_too_many_new_collections_for_the_kept_minima_is_one_line():
    from volumetric.engine.reference import kept_count, most_new, reference_mutual_update

    query, base, query_valid, base_valid = batch(6, 5, 10, 3, seed=3, layers=1)
    keep = kept_count(5, 0.3)  # k of a batch of 10: 2
    assert most_new(5, keep, 0.3) == 5 and most_new(5, 4, 0.3) is None  # all 4 partners kept: any number
    kept = torch.zeros(int(base_valid.sum()), keep)
    with pytest.raises(VolscanError, match="at most 5 new collections at once, got 6"):
        reference_mutual_update(query, base, 0.3, kept, query_valid, base_valid, options=QUIET)


def test_codegraph_keeps_the_refined_base_minima_without_changing_its_scores():
    """With exclusions, CoDeGraph's kept minima are each element's smallest distances to the
    other collections' base elements (the final pass), and keeping them changes no score."""
    from volumetric.engine.synthetic import synthetic_batch

    x = synthetic_batch(m=96, per_collection=10, seed=0).features
    n, m, _ = x.shape
    plain = CoDeGraph()(x, options=QUIET)
    kept = CoDeGraph()(x, options=QUIET, keep=6)
    assert bool(plain.excluded.any())  # the consistent group was found and excluded
    assert torch.equal(kept.scores, plain.scores) and torch.equal(kept.excluded, plain.excluded)
    base = ~kept.excluded
    expected = torch.full((n, m, n), math.inf, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j and base[j].any():
                expected[i, :, j] = torch.cdist(x[i].double(), x[j].double()).masked_fill(~base[j], math.inf).amin(1)
    (got,) = kept.kept_minima
    torch.testing.assert_close(got.double(), expected.sort(-1).values[..., :6].reshape(n * m, 6), rtol=1e-4, atol=1e-5)
