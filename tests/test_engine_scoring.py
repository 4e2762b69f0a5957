"""`score_collections`: one path for 2D and 3D grids, LNAMD views, averaging, scale options."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from volumetric.engine import CoDeGraph, ScoringConfig, lnamd, mutual_scores, score_collections
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import subset_partition
from volumetric.engine.synthetic import CONSISTENT_ANOMALY, NORMAL, synthetic_batch
from volumetric.errors import VolscanError

QUIET = EngineOptions(progress=False)


def grid_batch(grid: tuple[int, ...], n: int = 6, c: int = 8, layers: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.nn.functional.normalize(torch.randn(n, *grid, c + i, generator=g), dim=-1) for i in range(layers)]
    valid = torch.rand(n, *grid, generator=g) > 0.3
    return feats, valid


@pytest.mark.parametrize("grid", [(5, 4), (3, 4, 3)])
def test_musc_is_the_mean_of_view_scores(grid):
    feats, valid = grid_batch(grid)
    n, m = 6, math.prod(grid)
    config = ScoringConfig(lnamd_radii=(1, 3), engine=QUIET)
    result = score_collections(feats, valid, "musc", config)
    views = [
        mutual_scores(lnamd(f, r, valid).reshape(n, m, -1), 0.3, valid.reshape(n, m), options=QUIET)
        for f in feats
        for r in (1, 3)
    ]
    expected = torch.stack(views).mean(0).reshape(n, *grid)
    torch.testing.assert_close(result.element_scores, expected, equal_nan=True)
    assert torch.equal(result.element_scores.isnan(), ~valid)
    assert result.element_scores.dtype == torch.float32 and result.codegraph is None
    per_collection = torch.stack([result.element_scores[i][valid[i]].max() for i in range(n)])
    torch.testing.assert_close(result.collection_scores, per_collection)


@pytest.mark.parametrize("grid", [(4, 4), (2, 3, 4)])
def test_codegraph_without_structure_equals_musc_at_the_same_fraction(grid):
    feats, valid = grid_batch(grid, n=8, seed=3)
    config = ScoringConfig(lnamd_radii=(1, 3), musc_top_fraction=0.1, engine=QUIET)
    musc = score_collections(feats, valid, "musc", config)
    result = score_collections(feats, valid, "codegraph", config)
    assert result.method == "codegraph" and result.codegraph is not None
    torch.testing.assert_close(result.codegraph.mutual_scores.reshape(8, *grid), musc.element_scores, equal_nan=True)
    assert not result.codegraph.excluded.any()
    torch.testing.assert_close(result.element_scores, musc.element_scores, equal_nan=True)
    assert result.summary()["codegraph"]["excluded_fraction"] == result.codegraph.excluded_fraction


def test_graph_radii_choose_the_graph_views():
    feats, valid = grid_batch((3, 4, 3), n=9, seed=2)
    assert ScoringConfig(lnamd_radii=(1, 3, 5), graph_radii=(1, 5)).graph_views(2) == [0, 2, 3, 5]
    assert ScoringConfig().graph_views(2) == [1, 4]  # r = 3 of each layer
    assert ScoringConfig(lnamd_radii=(1, 5)).graph_views(2) == [0, 1, 2, 3]  # no r = 3: all views
    for radii, views in (((1,), 2), ((1, 3), 4)):
        config = ScoringConfig(lnamd_radii=(1, 3), graph_radii=radii, engine=QUIET)
        result = score_collections(feats, valid, "codegraph", config)
        assert result.codegraph.graph_views == views
        assert sum(w for _, _, w in result.codegraph.edges) == result.codegraph.suspicious_links * views


def test_void_tokens_do_not_change_scores():
    feats, valid = grid_batch((3, 3, 3), seed=4)
    changed = [f.clone() for f in feats]
    for f in changed:
        f[~valid] = 3.0
    config = ScoringConfig(engine=QUIET)
    before = score_collections(feats, valid, "codegraph", config)
    after = score_collections(changed, valid, "codegraph", config)
    torch.testing.assert_close(after.element_scores, before.element_scores, equal_nan=True)


@pytest.mark.parametrize("grid", [(8, 12), (4, 4, 6)])
def test_consistent_anomalies_on_2d_and_3d_grids(grid):
    batch = synthetic_batch(m=96, per_collection=10, seed=0)
    n = batch.features.shape[0]
    layer = batch.features.reshape(n, *grid, -1)
    config = ScoringConfig(lnamd_radii=(1,), engine=QUIET)
    result = score_collections([layer], None, "codegraph", config)
    kind = batch.kind.reshape(n, *grid)
    keep = (kind == NORMAL) | (kind == CONSISTENT_ANOMALY)
    labels = (kind[keep] == CONSISTENT_ANOMALY).numpy()
    assert roc_auc_score(labels, result.element_scores[keep].numpy()) >= 0.95
    assert roc_auc_score(labels, result.codegraph.mutual_scores.reshape(n, *grid)[keep].numpy()) < 0.6
    assert result.codegraph.outlier_collections == batch.consistent


def test_subsets_run_independently_and_merge():
    batch = synthetic_batch(n=24, m=48, per_collection=6, seed=1)
    layer = batch.features.reshape(24, 6, 8, -1)
    config = ScoringConfig(lnamd_radii=(1,), engine=EngineOptions(subsets=2, seed=5, progress=False))
    result = score_collections([layer], None, "codegraph", config)
    graph = result.codegraph
    assert sorted(i for c in graph.communities for i in c) == list(range(24))
    for part in subset_partition(24, 2, 5):
        alone = CoDeGraph()(lnamd(layer[part], 1).reshape(len(part), 48, -1), options=QUIET)
        torch.testing.assert_close(result.element_scores.reshape(24, -1)[part], alone.scores)
        assert torch.equal(graph.excluded[part], alone.excluded)
        ids = set(part.tolist())
        assert all(a in ids and b in ids for a, b, _ in graph.edges if a in ids or b in ids)
    assert graph.graph.vcount() == 24


def test_preselection_full_fraction_is_exact():
    feats, valid = grid_batch((3, 4), n=7, seed=6)
    base = score_collections(feats, valid, "musc", ScoringConfig(engine=QUIET))
    full = EngineOptions(preselect_fraction=1.0, progress=False)
    same = score_collections(feats, valid, "musc", ScoringConfig(engine=full))
    torch.testing.assert_close(same.element_scores, base.element_scores, equal_nan=True)
    fewer = EngineOptions(preselect_fraction=0.6, progress=False)
    fewer = score_collections(feats, valid, "codegraph", ScoringConfig(engine=fewer))
    assert torch.equal(fewer.element_scores.isnan(), ~valid)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, v: score_collections(f, v, "knn"), "method"),
        (lambda f, v: score_collections([f[0][..., 0, 0, :]], None), r"\(N, h, w, C\)"),
        (lambda f, v: score_collections([f[0], f[1][:, :2]], v), "does not match"),
        (lambda f, v: score_collections(f, v[:, :2]), "valid"),
        (lambda f, v: score_collections(f, torch.zeros_like(v)), "no valid element"),
        (lambda f, v: score_collections([f[0][:1]], None), "at least N = 2"),
        (lambda f, v: score_collections([f[0].masked_fill(v[..., None], math.nan)], v), "NaN"),
        (lambda f, v: ScoringConfig(lnamd_radii=(1, 2)), "lnamd_radii"),
        (lambda f, v: ScoringConfig(musc_top_fraction=0.0), "musc_top_fraction"),
        (lambda f, v: score_collections(f, v, config=ScoringConfig(engine=EngineOptions(subsets=4))), "subset"),
        (lambda f, v: ScoringConfig(lnamd_radii=(1, 3), graph_radii=(5,)), "graph_radii"),
        (lambda f, v: ScoringConfig(engine={"subsets": 2}), "EngineOptions"),
    ],
)
def test_bad_input(call, message):
    feats, valid = grid_batch((3, 3, 3), seed=8)
    with pytest.raises(VolscanError, match=message):
        call(feats, valid)
