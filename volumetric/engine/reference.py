"""Reference scoring: new (*query*) collections scored against a *base* of reference collections.

A query element x gets MuSc's score, `mean of the k smallest d(x, J)`, where J runs over the
reference collections and, unless `independent`, the other query collections; `k = max(1,
floor(f (n - 1)))` with n the batch x would be scored in: N + q (the reference plus every query)
or, `independent`, N + 1 (the reference plus x's own collection), so k equals what a full screen
of that batch would use. Reference elements are only neighbours, never scored: the pairs computed
are query x reference (and query x query unless `independent`), each once, through the same
blocked kernels as the full batch (`distances.collection_minima`, told that only the queries'
minima are read, and `mutual.refine_highest`): cost O(q N M^2) instead of O((N + q)^2 M^2).

`independent`: query x query pairs are left out of the plan and k is that of a batch of N + 1,
so a query's scores do not depend on the other queries: equal alone or with others up to the
float32 rounding of the call's shared centring, scale and block shapes (tested to 1e-5; with bf16,
elements outside the refined share keep bf16's error, and which elements are refined depends on
the batch; collection scores and peaks are fp32-exact either way).

CoDeGraph with a reference: the caller passes the reference run's exclusion mask as `excluded`;
excluded reference elements are nobody's neighbour (the reference's refined base), and the
query is scored at CoDeGraph's f on that base (docs/screen.md, "Reference cohorts", for why the
exclusions are reused rather than recomputed over the union).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from volumetric.engine.distances import collection_minima
from volumetric.engine.mutual import minima_scores, refine_highest, top_k_counts
from volumetric.engine.options import EngineOptions
from volumetric.engine.scoring import METHODS, ScoringConfig, lnamd_views
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.errors import VolscanError


@dataclass(frozen=True)
class ReferenceResult:
    """`element_scores` (q, *grid) float32 (NaN at void) and `collection_scores` (q,) float32
    (max over valid elements) of the query collections; `method`; `independent`."""

    element_scores: Tensor
    collection_scores: Tensor
    method: str
    independent: bool


def check_reference_config(config: ScoringConfig) -> None:
    """Refuse, before any work, settings reference scoring cannot honour (one line each)."""
    engine = config.engine
    if config.rscin is not None:
        raise VolscanError("reference scoring: RsCIN re-scores over the whole batch; set scoring rscin to none")
    if engine.subsets != 1 or engine.preselect_fraction is not None:
        raise VolscanError("reference scoring: subsets and preselect_fraction plan pairs inside one batch; "
                           "leave them at 1 and none")
    if engine.window is not None:
        raise VolscanError("reference scoring: --window is not supported (the windowed kernel computes every "
                           "pair of scans, so it would not be faster than a full screen)")


def reference_mutual_scores(
    query: Tensor | Sequence[Tensor],
    base: Tensor | Sequence[Tensor],
    top_fraction: float,
    query_valid: Tensor | None = None,
    base_valid: Tensor | None = None,
    *,
    independent: bool = False,
    squared: bool = False,
    options: EngineOptions | None = None,
) -> Tensor:
    """(q, M) float32 scores of the query elements (NaN at void) against the base.

    `query` (q, M, C) and `base` (N, M, C) tensors, or sequences of them (one per layer; `d(x, J)`
    averaged over layers). `query_valid` (q, M) / `base_valid` (N, M) bool: invalid query elements
    are not scored, invalid base elements (void, or excluded by CoDeGraph) are nobody's
    neighbour; a base collection left without a valid element takes no part. `top_fraction` f.
    `squared`: mean of squared distances (CoDeGraph's `squared`). `options`: as for
    `mutual_scores` (`window`, `subsets`, `preselect_fraction` are refused).
    """
    options = EngineOptions() if options is None else options
    check_fraction("top_fraction", top_fraction)
    if options.window is not None or options.subsets != 1 or options.preselect_fraction is not None:
        raise VolscanError("reference scoring: window, subsets and preselect_fraction are not supported")
    queries = [query] if isinstance(query, Tensor) else list(query)
    bases = [base] if isinstance(base, Tensor) else list(base)
    if len(queries) != len(bases):
        raise VolscanError(f"query has {len(queries)} layer(s), base {len(bases)}")
    if not queries or any(not isinstance(t, Tensor) or t.ndim != 3 for t in queries + bases):
        raise VolscanError("query / base: expected (q, M, C) and (N, M, C) tensors, one per layer")
    for i, (q, b) in enumerate(zip(queries, bases)):
        if q.shape[1:] != b.shape[1:]:
            raise VolscanError(f"layer {i}: query shape {tuple(q.shape)} does not match base {tuple(b.shape)} in (M, C)")
    n_query, m = queries[0].shape[:2]
    n_base = bases[0].shape[0]
    query_valid = as_valid(query_valid, n_query, m)
    base_valid = _as_mask(base_valid, n_base, m)
    kept = base_valid.any(1)  # a base collection whose every element is excluded has no d(x, J)
    bases = [b[kept] for b in bases]
    base_valid = base_valid[kept]
    # k as in a full batch of the reference (all of it, also collections left empty) + the queries
    batch = n_base + (1 if independent else n_query)
    k = int(top_k_counts(torch.tensor([batch]), top_fraction))
    return _query_scores([torch.cat([q.to(b.device), b]) for b, q in zip(bases, queries)],
                         torch.cat([query_valid, base_valid]), n_query, k, independent, squared, options)


def _query_scores(layers: list[Tensor], valid: Tensor, q: int, k: int, independent: bool, squared: bool,
                  options: EngineOptions) -> Tensor:
    """(q, M) scores of the first q collections of `layers` (q + N, M, C) against the base (and
    each other unless `independent`).

    Queries first: each query meets the base (and the later queries) as one run of partner
    collections, and only the query elements' minima are reduced (`collection_minima(scored=q)`)."""
    layers = as_layers(layers)
    n = valid.shape[0]
    partners = torch.zeros(n, n, dtype=torch.bool)
    partners[:q] = True
    partners[:, :q] = True
    if independent:
        partners[:q, :q] = False
    partners.fill_diagonal_(False)
    minima = collection_minima(layers, valid, partners=partners, options=options, scored=q)
    if squared:
        minima.distances.square_()
    ks = torch.full((n,), k, dtype=torch.long)
    among = minima.owner < q  # the queries' elements only: base rows are not scored
    chosen = refine_highest(layers, minima, ks, partners=partners, options=options, among=among)
    if squared and len(chosen):
        minima.distances[chosen] = minima.distances[chosen].square_()
    return minima_scores(minima, ks)[:q]


def _as_mask(valid: Tensor | None, n: int, m: int) -> Tensor:
    """(N, M) bool base mask (None = all valid); unlike `as_valid`, empty collections are allowed."""
    if valid is None:
        return torch.ones(n, m, dtype=torch.bool)
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (n, m):
        got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise VolscanError(f"base_valid: expected a bool tensor of shape {(n, m)}, got {got}")
    if not bool(valid.any()):
        raise VolscanError("base_valid: no valid element in the reference")
    return valid.cpu()


def score_against_reference(
    query_layers: Sequence[Tensor],
    base_layers: Sequence[Tensor],
    query_valid: Tensor,
    base_valid: Tensor,
    method: str = "codegraph",
    config: ScoringConfig | None = None,
    *,
    excluded: Tensor | None = None,
    independent: bool = False,
) -> ReferenceResult:
    """`score_collections` for query collections against a reference batch.

    `query_layers` (q, *grid, C_l) and `base_layers` (N, *grid, C_l), one per backbone layer;
    `query_valid` (q, *grid) / `base_valid` (N, *grid) bool; `excluded` (N, *grid) bool: the
    reference's CoDeGraph exclusions (method "codegraph"; None = nothing excluded). LNAMD views
    as `score_collections` builds them (each collection's own LayerNorm), scored per view at
    `musc_top_fraction` (MuSc) or CoDeGraph's `top_fraction` on the refined base, then averaged.
    """
    config = ScoringConfig() if config is None else config
    if method not in METHODS:
        raise VolscanError(f"method: expected one of {METHODS}, got {method!r}")
    check_reference_config(config)
    q, *grid = query_layers[0].shape[:-1]
    n = base_layers[0].shape[0]
    if list(base_layers[0].shape[1:-1]) != grid:
        raise VolscanError(f"grids differ: query {tuple(grid)}, reference {tuple(base_layers[0].shape[1:-1])}")
    m = math.prod(grid)
    neighbours = base_valid if excluded is None else base_valid & ~excluded
    top_fraction = config.musc_top_fraction if method == "musc" else config.codegraph.top_fraction
    squared = method == "codegraph" and config.codegraph.squared
    views = zip(
        lnamd_views(list(query_layers), query_valid, config.lnamd_radii, config.layer_norm, border=config.lnamd_border),
        lnamd_views(list(base_layers), base_valid, config.lnamd_radii, config.layer_norm, border=config.lnamd_border),
    )
    total, count = None, 0
    for query_view, base_view in views:
        scores = reference_mutual_scores(
            query_view, base_view, top_fraction, query_valid.reshape(q, m), neighbours.reshape(n, m),
            independent=independent, squared=squared, options=config.engine,
        )
        total = scores if total is None else total.add_(scores)
        count += 1
    element_scores = (total / count).reshape(q, *grid)
    return ReferenceResult(
        element_scores=element_scores,
        collection_scores=element_scores.reshape(q, m).nan_to_num(-torch.inf).amax(1),
        method=method,
        independent=independent,
    )
