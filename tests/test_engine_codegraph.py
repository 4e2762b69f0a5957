"""CoDeGraph on synthetic batches with random and consistent anomalies, plus reference checks of
its graph growth, targeted exclusion and masked final scoring."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from volumetric.engine import CoDeGraph, mutual_scores
from volumetric.engine.distances import collection_minima
from volumetric.engine.synthetic import CONSISTENT_ANOMALY, NORMAL, RANDOM_ANOMALY, synthetic_batch
from volumetric.errors import VolscanError


def auroc(scores: torch.Tensor, kind: torch.Tensor, positive: int) -> float:
    keep = (kind == NORMAL) | (kind == positive)
    return roc_auc_score((kind[keep] == positive).numpy(), scores[keep].numpy())


@pytest.fixture(scope="module", params=[0, 2])
def consistent_run(request):
    batch = synthetic_batch(m=96, per_collection=10, seed=request.param)
    return batch, CoDeGraph()(batch.features, progress=False)


def test_mutual_scoring_misses_consistent_but_not_random_anomalies(consistent_run):
    batch, result = consistent_run
    musc = mutual_scores(batch.features, 0.1)
    assert auroc(musc, batch.kind, RANDOM_ANOMALY) > 0.95
    assert auroc(musc, batch.kind, CONSISTENT_ANOMALY) < 0.6
    torch.testing.assert_close(result.mutual_scores, musc)


def test_codegraph_flags_the_consistent_group(consistent_run):
    batch, result = consistent_run
    flagged = [result.communities[c] for c in result.outlier_communities]
    assert flagged == [batch.consistent]
    assert result.densities[result.outlier_communities[0]] > result.density_fences[result.outlier_communities[0]]


def test_codegraph_excludes_mostly_anomalous_elements_and_fixes_the_ranking(consistent_run):
    batch, result = consistent_run
    anomalous = batch.kind == CONSISTENT_ANOMALY
    excluded = result.excluded
    assert int(excluded.sum()) > 0
    assert float((excluded & anomalous).sum() / excluded.sum()) >= 0.8
    assert float((excluded & anomalous).sum() / anomalous.sum()) >= 0.8
    musc_auc = auroc(result.mutual_scores, batch.kind, CONSISTENT_ANOMALY)
    codegraph_auc = auroc(result.scores, batch.kind, CONSISTENT_ANOMALY)
    assert codegraph_auc >= 0.95 and codegraph_auc > musc_auc + 0.3
    assert auroc(result.scores, batch.kind, RANDOM_ANOMALY) > 0.95
    assert result.excluded_fraction == pytest.approx(float(excluded.float().mean()))


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_without_consistent_anomalies_codegraph_is_mutual_scoring(seed):
    batch = synthetic_batch(m=96, per_collection=10, consistent=0, seed=seed)
    result = CoDeGraph()(batch.features, progress=False)
    assert result.excluded_fraction <= 0.005
    same = (result.scores - mutual_scores(batch.features, 0.1)).abs() <= 1e-6
    assert float(same.float().mean()) >= 0.99


def test_graph_growth_matches_the_batch_loop():
    batch = synthetic_batch(n=16, m=40, per_collection=6, consistent=4, seed=5)
    method = CoDeGraph(link_batch=7, coverage=0.9, eps=0.2)
    result = method(batch.features, progress=False)
    vectors = mutual_scores(batch.features, 0.1, return_vectors=True)
    n, m = 16, 40
    r_ref = method.reference_rank(n)
    links = []
    for i in range(n):
        for e in range(m):
            d = vectors.sorted_distances[i, e].double()
            for rank in range(r_ref - 1):
                ratio = (d[rank] / d[r_ref - 1]) * d[rank] ** -0.2
                links.append((float(ratio), i, int(vectors.collections[i, e, rank])))
    links.sort()
    weights, touched, used = {}, set(), 0
    while len(touched) < math.ceil(0.9 * n):
        for _, a, b in links[used : used + 7]:
            weights[(min(a, b), max(a, b))] = weights.get((min(a, b), max(a, b)), 0) + 1
            touched |= {a, b}
        used += 7
    assert result.suspicious_links == used
    assert {(a, b): w for a, b, w in result.edges} == weights
    degrees = result.graph.strength(weights="weight")
    assert sum(d > 0 for d in degrees) >= math.ceil(0.9 * n)


def test_exclusion_and_masked_scores_match_brute_force():
    batch = synthetic_batch(n=20, m=48, per_collection=8, consistent=4, seed=7)
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(20, 48, generator=g) > 0.15
    method = CoDeGraph(dependency_percentile=95.0)
    result = method(batch.features, valid, progress=False)
    assert result.outlier_communities, "the planted group should be flagged"
    x, n = batch.features, 20
    k = max(1, math.floor(0.1 * (n - 1)))
    vectors = mutual_scores(x, 0.1, valid, return_vectors=True)
    # targeted exclusion: dependency ratio against the 95th percentile outside the community
    expected = torch.zeros(n, 48, dtype=torch.bool)
    before = vectors.sorted_distances[..., :k].mean(-1)
    for c in result.outlier_communities:
        members = torch.tensor(result.communities[c])
        kept = ~torch.isin(vectors.collections, members)
        without = vectors.sorted_distances.masked_fill(~kept, math.inf).sort(-1).values[..., :k].mean(-1)
        ratio = without / before
        inside = torch.isin(torch.arange(n), members)[:, None].expand(n, 48) & valid
        outside = ~torch.isin(torch.arange(n), members)[:, None].expand(n, 48) & valid
        expected |= inside & (ratio > torch.quantile(ratio[outside], 0.95))
    assert torch.equal(result.excluded, expected)
    assert not (result.excluded & ~valid).any()
    # final scores: neighbours whose nearest element is excluded count as the largest distance
    for i in range(n):
        for e in range(48):
            if not valid[i, e]:
                assert math.isnan(result.scores[i, e])
                continue
            entries = []
            for j in range(n):
                if j == i:
                    continue
                d = (x[j] - x[i, e]).norm(dim=1).masked_fill(~valid[j], math.inf)
                entries.append((float(d.min()), bool(result.excluded[j, d.argmin()])))
            worst = max(v for v, _ in entries)
            masked = sorted(worst if hit else v for v, hit in entries)
            assert result.scores[i, e] == pytest.approx(sum(masked[:k]) / k, rel=1e-5)


def test_views_are_averaged_and_may_be_lazy():
    batch = synthetic_batch(n=12, m=32, per_collection=5, consistent=3, seed=2)
    other = batch.features + 0.05 * torch.randn(batch.features.shape, generator=torch.Generator().manual_seed(0))
    result = CoDeGraph()(iter([batch.features, other]), progress=False)
    expected = (mutual_scores(batch.features, 0.1) + mutual_scores(other, 0.1)) / 2
    torch.testing.assert_close(result.mutual_scores, expected)
    assert result.graph.vcount() == 12 and all(w > 0 for _, _, w in result.edges)
    assert sorted(i for c in result.communities for i in c) == list(range(12))
    summary = result.summary()
    assert summary["suspicious_links"] == result.suspicious_links and len(summary["edges"]) == result.graph.ecount()


def _minima_with_missing_partner():
    features = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    partners = ~torch.eye(5, dtype=torch.bool)
    partners[0, 1] = partners[1, 0] = False
    return collection_minima([features], torch.ones(5, 4, dtype=torch.bool), partners=partners, nearest=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=1.0), "eps"),
        (dict(coverage=0.0), "coverage"),
        (dict(link_batch=0), "link_batch"),
        (dict(iqr_k=-1.0), "iqr_k"),
        (dict(dependency_percentile=0.0), "dependency_percentile"),
        (dict(reference_fraction=1.5), "reference_fraction"),
        (dict(resolution_quantile=2.0), "resolution_quantile"),
        (dict(top_fraction=0.0), "top_fraction"),
    ],
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(VolscanError, match=message):
        CoDeGraph(**kwargs)


def test_bad_views():
    with pytest.raises(VolscanError, match="does not match"):
        CoDeGraph()([torch.randn(4, 5, 3), torch.randn(4, 6, 3)], progress=False)
    with pytest.raises(VolscanError, match="no view"):
        CoDeGraph()([], progress=False)
    with pytest.raises(VolscanError, match="at least N = 2"):
        CoDeGraph()(torch.randn(1, 5, 3), progress=False)
    with pytest.raises(VolscanError, match="at least 3 collections"):
        CoDeGraph()(torch.randn(2, 5, 3), progress=False)
    with pytest.raises(VolscanError, match="pre-select more"):
        CoDeGraph(reference_fraction=1.0).refine([_minima_with_missing_partner()])
