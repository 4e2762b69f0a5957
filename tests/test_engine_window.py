"""Position-aware scoring (`EngineOptions.window`) against brute force restricted to the window:
plain loops over cells in float64, 2D and 3D grids, void cells, several layers, bf16, the
refinement of the highest elements, CoDeGraph's ranked lists, graph and final pass; `window=None`
bit-identical to the global path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from volumetric.engine import CoDeGraph, EngineOptions, ScoringConfig, lnamd, mutual_scores, score_collections
from volumetric.engine.distances import collection_minima
from volumetric.engine.mutual import minima_scores, top_k_counts
from volumetric.engine.ranked import ranked_minima
from volumetric.engine.synthetic import synthetic_batch
from volumetric.engine.window import window_element_minima, window_minima, window_offsets
from volumetric.errors import VolscanError

QUIET = EngineOptions(progress=False)


def near_cells(grid: tuple[int, ...], window: int) -> torch.Tensor:
    """(M, M) bool: cells within `window` of each other (Chebyshev), by listing coordinates."""
    coords = torch.tensor(list(itertools.product(*[range(g) for g in grid])))
    return (coords[:, None, :] - coords[None, :, :]).abs().amax(-1) <= window


def brute_window(layers, valid, grid, window, base=None):
    """(N, M, N) float64 d_w(x, J ∩ base) averaged over layers (+inf for J = own, void x, or J
    without base element) and (N, M, N) nearest positions (first layer): for each element, the
    candidates are J's base cells within the window, or all of J's base cells when none is."""
    n, m = valid.shape
    base = valid if base is None else base
    near = near_cells(grid, window)
    d = torch.full((n, m, n), math.inf, dtype=torch.float64)
    where = torch.full((n, m, n), -1, dtype=torch.int64)
    for i in range(n):
        for e in range(m):
            if not valid[i, e]:
                continue
            for j in range(n):
                if j == i or not base[j].any():
                    continue
                candidates = base[j] & near[e]
                if not candidates.any():
                    candidates = base[j]
                cells = candidates.nonzero().flatten()
                per_layer = [(layer[j, cells].double() - layer[i, e].double()).norm(dim=1) for layer in layers]
                d[i, e, j] = float(sum(p.min() for p in per_layer)) / len(layers)
                where[i, e, j] = int(cells[per_layer[0].argmin()])
    return d, where


def brute_scores(layers, valid, grid, window, top_fraction):
    n = valid.shape[0]
    k = max(1, math.floor(top_fraction * (n - 1)))
    d, _ = brute_window(layers, valid, grid, window)
    scores = d.sort(-1).values[..., :k].mean(-1)
    return scores.masked_fill(~valid, math.nan)


def random_grid_batch(n, grid, c, seed, void=0.0, layers=1):
    g = torch.Generator().manual_seed(seed)
    m = math.prod(grid)
    feats = [torch.randn(n, m, c + i, generator=g) for i in range(layers)]
    valid = torch.rand(n, m, generator=g) >= void
    valid[torch.arange(n), torch.randint(m, (n,), generator=g)] = True
    return feats, valid


def assert_close_scores(actual, expected, rtol=1e-5, atol=1e-6):
    assert torch.equal(actual.isnan(), expected.isnan())
    ok = ~expected.isnan()
    torch.testing.assert_close(actual[ok].double(), expected[ok], rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "grid, window, void, layers, block_mb",
    [
        ((4, 5, 3), 1, 0.3, 1, 32.0),
        ((4, 5, 3), 0, 0.0, 1, 32.0),
        ((3, 4, 5), 2, 0.5, 2, 0.001),  # chunks of a few cells
        ((7, 6), 1, 0.3, 1, 32.0),
        ((6, 7), 3, 0.4, 2, 0.001),
    ],
)
def test_window_scores_equal_brute_force_restricted_to_the_window(grid, window, void, layers, block_mb):
    feats, valid = random_grid_batch(6, grid, 5, seed=window * 10 + len(grid), void=void, layers=layers)
    options = EngineOptions(window=window, block_mb=block_mb, progress=False)
    expected = brute_scores(feats, valid, grid, window, 0.4)
    assert_close_scores(mutual_scores(feats, 0.4, valid, options=options, grid=grid), expected)


def test_window_distances_and_nearest_positions_equal_brute_force():
    grid = (4, 3, 5)
    feats, valid = random_grid_batch(5, grid, 4, seed=3, void=0.4)
    # collection 4 keeps only two corner cells: most elements find none of it in their window
    valid[4] = False
    valid[4, [0, 59]] = True
    d, where = brute_window(feats, valid, grid, 1)
    minima = window_minima(feats, valid, grid, nearest=True, options=EngineOptions(window=1, progress=False))
    torch.testing.assert_close(minima.distances.double(), d[valid], rtol=1e-5, atol=1e-6)
    assert torch.equal(minima.nearest.long(), where[valid])
    near = near_cells(grid, 1)
    cells = valid.nonzero()[:, 1]
    widened = ~near[cells][:, [0, 59]].any(1) & (minima.owner != 4)
    assert widened.any() and bool(torch.isfinite(minima.distances[widened, 4]).all())


def test_window_none_is_the_global_path_bit_for_bit():
    feats, valid = random_grid_batch(7, (4, 4, 4), 9, seed=5, void=0.3, layers=2)
    k = top_k_counts(torch.tensor([7] * 7), 0.3)
    expected = minima_scores(collection_minima(feats, valid, options=QUIET), k)
    assert expected[valid].isfinite().all() and expected[~valid].isnan().all()
    for options in (QUIET, EngineOptions(window=None, progress=False)):
        scores = mutual_scores(feats, 0.3, valid, options=options, grid=(4, 4, 4))
        assert torch.equal(scores[valid], expected[valid]) and scores[~valid].isnan().all()


def test_a_window_covering_the_grid_is_the_global_search():
    feats, valid = random_grid_batch(6, (3, 4, 5), 6, seed=8, void=0.3)
    wide = mutual_scores(feats, 0.3, valid, options=EngineOptions(window=4, progress=False), grid=(3, 4, 5))
    torch.testing.assert_close(wide, mutual_scores(feats, 0.3, valid, options=QUIET), equal_nan=True)


def test_offsets_are_half_the_window_and_clipped_to_the_grid():
    assert len(window_offsets((8, 8, 8), 2, half=True)) == (125 + 1) // 2
    assert len(window_offsets((8, 8, 8), 2, half=False)) == 125
    assert window_offsets((1, 5), 6, half=True) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]


def test_bf16_window_is_close_and_its_highest_elements_exact():
    grid = (5, 6, 4)
    feats, valid = random_grid_batch(8, grid, 48, seed=21, void=0.3)
    exact = mutual_scores(feats, 0.3, valid, options=EngineOptions(window=1, progress=False), grid=grid)
    approx = mutual_scores(feats, 0.3, valid, options=EngineOptions(window=1, precision="bf16", progress=False),
                           grid=grid)
    relative = ((approx[valid] - exact[valid]).abs() / exact[valid]).max()
    assert 0 < relative < 2e-3  # reduced precision really used, and still close (as without a window)
    top = exact[valid].topk(3).indices
    torch.testing.assert_close(approx[valid][top], exact[valid][top], rtol=1e-5, atol=1e-6)


def test_element_minima_in_the_window_equal_the_full_pass():
    grid = (5, 4, 4)
    feats, valid = random_grid_batch(6, grid, 7, seed=13, void=0.3, layers=2)
    partners = ~torch.eye(6, dtype=torch.bool)
    partners[0, 3] = partners[3, 0] = False
    options = EngineOptions(window=1, progress=False)
    full = window_minima(feats, valid, grid, partners=partners, options=options)
    chosen = torch.tensor([0, 5, 6, 40, 41, int(valid.sum()) - 1])
    some = window_element_minima(feats, valid, chosen, grid, partners=partners, options=options)
    torch.testing.assert_close(some, full.distances[chosen], rtol=1e-5, atol=1e-6)
    assert torch.isinf(some[full.owner[chosen] == 0, 3]).all()


def test_ranked_lists_in_the_window_with_base_and_partners():
    grid = (3, 4, 4)
    feats, valid = random_grid_batch(9, grid, 5, seed=3, void=0.2)
    x = feats[0]
    g = torch.Generator().manual_seed(4)
    base = valid & (torch.rand(9, 48, generator=g) > 0.3)
    partners = ~torch.eye(9, dtype=torch.bool)
    partners[0, 4] = partners[4, 0] = False
    tiny = EngineOptions(progress=False, block_mb=0.01, window=1)  # several block pairs
    ranked = ranked_minima(x, valid, 4, base=base, partners=partners, nearest=True, options=tiny, grid=grid)
    d, where = brute_window([x], valid, grid, 1, base=base)
    d[0, :, 4] = d[4, :, 0] = math.inf
    values, order = d[valid].sort(-1)
    torch.testing.assert_close(ranked.distances, values[:, :4].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ranked.collections.long(), order[:, :4])
    assert torch.equal(ranked.nearest.long(), where[valid].gather(1, order[:, :4]))


def test_codegraph_graph_in_the_window_matches_the_literal_batch_loop():
    """The layer-wise graph built from windowed sorted vectors, written as the literal loop of
    test_engine_codegraph.py over brute-force windowed distances."""
    grid = (2, 4, 5)
    batch = synthetic_batch(n=16, m=40, per_collection=6, consistent=4, seed=5)
    other = batch.features + 0.3 * torch.randn(batch.features.shape, generator=torch.Generator().manual_seed(0))
    views = [batch.features, other]
    method = CoDeGraph(link_batch=7, coverage=1.0, eps=0.2)
    result = method(views, options=EngineOptions(window=1, progress=False), grid=grid)
    n, m, r_ref = 16, 40, method.reference_rank(16)
    valid = torch.ones(n, m, dtype=torch.bool)
    sorted_views = [brute_window([v], valid, grid, 1)[0].sort(-1) for v in views]
    links = []
    for i in range(n):
        for e in range(m):
            averaged = sum(s.values[i, e] for s in sorted_views) / 2
            for rank in range(r_ref - 1):
                ratio = averaged[rank] ** 0.8 / averaged[r_ref - 1]
                links.append((float(ratio), i, [int(s.indices[i, e, rank]) for s in sorted_views]))
    links.sort(key=lambda link: link[0])
    weights, touched, used = {}, set(), 0
    while len(touched) < n:
        for _, a, targets in links[used : used + 7]:
            for b in targets:
                weights[(min(a, b), max(a, b))] = weights.get((min(a, b), max(a, b)), 0) + 1
                touched |= {a, b}
        used += 7
    assert result.suspicious_links == used
    assert {(a, b): w for a, b, w in result.edges} == weights
    k = math.floor(0.1 * (n - 1))
    musc = sum(s.values[..., :k].mean(-1) for s in sorted_views) / 2
    torch.testing.assert_close(result.mutual_scores, musc.float(), rtol=1e-5, atol=1e-6)


def test_codegraph_final_scores_in_the_window_on_a_3d_grid_with_void():
    """Through `score_collections` on a 3D grid with void cells: every valid cell's final score is
    the top-k mean of its windowed distances to the other collections' base cells (valid, not
    excluded), averaged over views."""
    batch = synthetic_batch(m=96, per_collection=10, seed=0)
    n, grid = batch.features.shape[0], (4, 6, 4)
    g = torch.Generator().manual_seed(7)
    valid = torch.rand(n, *grid, generator=g) > 0.1
    layers = [batch.features, batch.features + 0.05 * torch.randn(batch.features.shape, generator=g)]
    layers = [x.reshape(n, *grid, -1).masked_fill(~valid[..., None], 9.0) for x in layers]
    config = ScoringConfig(lnamd_radii=(1,), engine=EngineOptions(window=2, progress=False))
    result = score_collections(layers, valid, "codegraph", config)
    excluded = result.codegraph.excluded
    flat_valid = valid.reshape(n, -1)
    k = math.floor(0.1 * (n - 1))
    reference = torch.zeros(n, 96, dtype=torch.float64)
    for layer in layers:
        view = lnamd(layer, 1, valid).reshape(n, 96, -1)
        d, _ = brute_window([view], flat_valid, grid, 2, base=flat_valid & ~excluded)
        reference += d.sort(-1).values[..., :k].mean(-1) / len(layers)
    scores = result.element_scores.reshape(n, -1)
    torch.testing.assert_close(scores[flat_valid], reference[flat_valid].float(), rtol=1e-4, atol=1e-5)
    assert scores[~flat_valid].isnan().all()


def test_musc_through_score_collections_in_2d_takes_the_grid():
    feats, valid = random_grid_batch(5, (6, 5), 4, seed=2, void=0.2)
    grid_feats = [f.reshape(5, 6, 5, -1) for f in feats]
    config = ScoringConfig(lnamd_radii=(1,), engine=EngineOptions(window=1, progress=False))
    result = score_collections(grid_feats, valid.reshape(5, 6, 5), "musc", config)
    view = lnamd(grid_feats[0], 1, valid.reshape(5, 6, 5)).reshape(5, 30, -1)
    expected = brute_scores([view], valid, (6, 5), 1, 0.3)
    assert_close_scores(result.element_scores.reshape(5, -1), expected.float().double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(options=EngineOptions(window=1)), "needs the grid shape"),
        (dict(options=EngineOptions(window=1), grid=(3, 3)), "does not hold the M = 12"),
    ],
)
def test_window_needs_a_matching_grid(kwargs, message):
    with pytest.raises(VolscanError, match=message) as caught:
        mutual_scores(torch.randn(4, 12, 3), 0.5, **kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("window", [-1, 1.5, True, "2"])
def test_bad_window_is_refused(window):
    with pytest.raises(VolscanError, match="window"):
        EngineOptions(window=window)
