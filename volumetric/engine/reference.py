"""Reference scoring: new (*query*) collections scored against a *base* of reference collections.

A query element x gets MuSc's score, `mean of the k smallest d(x, J)`, where J runs over the
reference collections and, unless `independent`, the other query collections; `k = max(1,
floor(f (n - 1)))` with n the batch x would be scored in: N + q (the reference plus every query)
or, `independent`, N + 1 (the reference plus x's own collection), so k equals what a full screen
of that batch would use. Reference elements are only neighbours, never scored: the pairs computed
are query x reference (and query x query unless `independent`), each once, through the same
blocked kernels as the full batch (`distances.collection_minima`, told that only the queries'
minima are read, and `mutual.refine_highest`): cost O(q N M^2) instead of O((N + q)^2 M^2).

Updating the base (`reference_mutual_update`, not `independent`): a full screen of base +
queries would also score the base elements with k from N + q - 1 partners, the queries among
them. The base run kept each element's K smallest `d(x, J)` of its final pass
(`ScoringResult.kept_minima`, K = `kept_count`: the k of a batch of REFERENCE_GROWTH x N, or
all N - 1 partners); the same query x base products are reduced in the other direction too
(`d(y, Q)` for every base element y and query Q), pooled with the kept minima, and each base
element's score is the mean of the k smallest of the pool: what a full screen of the union
computes, from the kept K and the q new minima (exact while k <= K; beyond, refused). Base
elements CoDeGraph excluded are scored but nobody's neighbour: their minima to the queries come
from `distances.element_minima` (fp32). With bf16 the other base elements' new minima keep
bf16's error (only query elements are refined).

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
from typing import Any, NamedTuple

import torch
from torch import Tensor

from volumetric.engine.distances import collection_minima, element_minima
from volumetric.engine.mutual import refine_highest, smallest_mean, top_k_counts
from volumetric.engine.options import EngineOptions
from volumetric.engine.scoring import METHODS, ScoringConfig, lnamd_views
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.errors import VolscanError


# A reference keeps each element's smallest minima for a union up to this many times its size.
REFERENCE_GROWTH = 2


@dataclass(frozen=True)
class ReferenceResult:
    """`element_scores` (q, *grid) float32 (NaN at void) and `collection_scores` (q,) float32
    (max over valid elements) of the query collections; `method`; `independent`;
    `reference_scores` (N,) float32: the reference collections' scores updated with the queries
    as partners (as a full screen of the union gives them), None when not updated."""

    element_scores: Tensor
    collection_scores: Tensor
    method: str
    independent: bool
    reference_scores: Tensor | None = None


class _Update(NamedTuple):
    """What updating the base needs: `scored` (N, M) bool base elements to score (valid ones;
    a superset of the neighbours) and `minima` (T_s, K) their kept smallest minima."""

    scored: Tensor
    minima: Tensor


def kept_count(n: int, top_fraction: float) -> int:
    """K, the minima a batch of n keeps per element for later updates: the k of a batch of
    REFERENCE_GROWTH x n (the reference plus up to (REFERENCE_GROWTH - 1) n new collections),
    at most n - 1 (all partners: then any number of new collections)."""
    return min(n - 1, int(top_k_counts(torch.tensor([REFERENCE_GROWTH * n]), top_fraction)))


def most_new(n: int, kept: int, top_fraction: float) -> int | None:
    """The most new collections an update of a batch of n with `kept` minima per element scores
    exactly (None = any number: every partner is kept)."""
    if kept >= n - 1:
        return None
    q = 0
    while int(top_k_counts(torch.tensor([n + q + 1]), top_fraction)) <= kept:
        q += 1
    return q


def reference_refusal(config: ScoringConfig) -> str | None:
    """Why reference scoring cannot honour `config` (one line), or None when it can."""
    engine = config.engine
    if config.rscin is not None:
        return "reference scoring: RsCIN re-scores over the whole batch; set scoring rscin to none"
    if engine.subsets != 1 or engine.preselect_fraction is not None:
        return "reference scoring: subsets and preselect_fraction plan pairs inside one batch; leave them at 1 and none"
    if engine.window is not None:
        return ("reference scoring: --window is not supported (the windowed kernel computes every pair of scans, so "
                "it would not be faster than a full screen)")
    if config.codegraph.unflagged_fraction is not None:
        return ("reference scoring: codegraph unflagged_fraction makes the final pass's f depend on whether anything "
                "was excluded; leave it at none")
    return None


def check_reference_config(config: ScoringConfig) -> None:
    """Refuse, before any work, settings reference scoring cannot honour (one line each)."""
    refusal = reference_refusal(config)
    if refusal is not None:
        raise VolscanError(refusal)


def method_top_fraction(config: ScoringConfig, method: str) -> float:
    """The f a method's final scoring pass uses: `musc_top_fraction`, or CoDeGraph's
    `final_fraction` when set, else its `top_fraction`."""
    if method == "musc":
        return config.musc_top_fraction
    return config.codegraph.final_fraction or config.codegraph.top_fraction


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
    queries, bases, query_valid, base_valid, options = _checked(query, base, top_fraction, query_valid, base_valid,
                                                                options)
    # k as in a full batch of the reference (all of it, also collections left empty) + the queries
    k = int(top_k_counts(torch.tensor([base_valid.shape[0] + (1 if independent else len(query_valid))]), top_fraction))
    return _pair_scores(queries, bases, query_valid, base_valid, k, independent, squared, options, None)[0]


def reference_mutual_update(
    query: Tensor | Sequence[Tensor],
    base: Tensor | Sequence[Tensor],
    top_fraction: float,
    base_minima: Tensor,
    query_valid: Tensor | None = None,
    base_valid: Tensor | None = None,
    *,
    base_scored: Tensor | None = None,
    squared: bool = False,
    options: EngineOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """(q, M) query scores and (N, M) base scores (NaN outside `base_scored`), both as a full
    batch of base + queries gives them (module docstring).

    Arguments as `reference_mutual_scores` (not independent); `base_scored` (N, M) bool: the
    base elements to score (default `base_valid`; those outside `base_valid` are scored but
    nobody's neighbour, CoDeGraph's excluded ones); `base_minima` (T_s, K) float32: their kept
    smallest minima from the base's own batch, elements ordered collection by collection,
    position by position (`ScoringResult.kept_minima`). One line when K is too small for q.
    """
    queries, bases, query_valid, base_valid, options = _checked(query, base, top_fraction, query_valid, base_valid,
                                                                options)
    n, m = base_valid.shape
    scored = base_valid.clone() if base_scored is None else base_scored.cpu()
    if tuple(scored.shape) != (n, m) or scored.dtype != torch.bool or bool((base_valid & ~scored).any()):
        raise VolscanError(f"base_scored: expected a bool tensor of shape {(n, m)} holding every neighbour")
    if base_minima.ndim != 2 or base_minima.shape[0] != int(scored.sum()):
        raise VolscanError(f"base_minima: expected ({int(scored.sum())}, K) kept minima, got {tuple(base_minima.shape)}")
    q = len(query_valid)
    k = int(top_k_counts(torch.tensor([n + q]), top_fraction))
    most = most_new(n, base_minima.shape[1], top_fraction)
    if most is not None and q > most:
        raise VolscanError(f"the reference kept {base_minima.shape[1]} minima per element: enough to update its "
                           f"scores for at most {most} new collections at once, got {q}")
    return _pair_scores(queries, bases, query_valid, base_valid, k, False, squared, options,
                        _Update(scored, base_minima.float()))


def _checked(query: Tensor | Sequence[Tensor], base: Tensor | Sequence[Tensor], top_fraction: float,
             query_valid: Tensor | None, base_valid: Tensor | None,
             options: EngineOptions | None) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, EngineOptions]:
    """The inputs of the reference scorers checked (one line each), as layer lists and masks."""
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
    return queries, bases, as_valid(query_valid, n_query, m), _as_mask(base_valid, bases[0].shape[0], m), options


def _pair_scores(queries: list[Tensor], bases: list[Tensor], query_valid: Tensor, neighbours: Tensor, k: int,
                 independent: bool, squared: bool, options: EngineOptions,
                 update: _Update | None) -> tuple[Tensor, Tensor | None]:
    """(q, M) query scores against the base's `neighbours` (and each other unless
    `independent`), and with `update` the (N, M) updated base scores (else None).

    Queries first: each query meets the base (and the later queries) as one run of partner
    collections; without `update` only the query elements' minima are reduced
    (`collection_minima(scored=q)`). Base collections without a neighbour take no part."""
    q, m = query_valid.shape
    kept = neighbours.any(1)  # a base collection whose every element is excluded has no d(x, J)
    layers = as_layers([torch.cat([qu.to(b.device), b[kept.to(b.device)]]) for qu, b in zip(queries, bases)])
    valid = torch.cat([query_valid, neighbours[kept]])
    total = valid.shape[0]
    partners = torch.zeros(total, total, dtype=torch.bool)
    partners[:q] = True
    partners[:, :q] = True
    if independent:
        partners[:q, :q] = False
    partners.fill_diagonal_(False)
    minima = collection_minima(layers, valid, partners=partners, options=options,
                               scored=q if update is None else None)
    base_scores = None
    if update is not None:
        base_scores = _updated_base(minima, update, queries, bases, query_valid, neighbours, k, squared, options)
    if squared:
        minima.distances.square_()
    ks = torch.full((total,), k, dtype=torch.long)
    among = minima.owner < q  # the queries' elements: the base's are scored from the pool (update)
    chosen = refine_highest(layers, minima, ks, partners=partners, options=options, among=among)
    if squared and len(chosen):
        minima.distances[chosen] = minima.distances[chosen].square_()
    # the query rows only: the base's are +inf here (or scored from the pool), and 4 x as many
    scores = torch.full((q, m), torch.nan)
    scores[query_valid] = smallest_mean(minima.distances[among], ks[minima.owner[among]])
    return scores, base_scores


def _updated_base(minima: Any, update: _Update, queries: list[Tensor], bases: list[Tensor], query_valid: Tensor,
                  neighbours: Tensor, k: int, squared: bool, options: EngineOptions) -> Tensor:
    """(N, M) base scores: per scored element, the mean of the k smallest of its kept minima and
    its new minima to the q queries (squared first if `squared`), NaN elsewhere.

    Neighbours' new minima come from `minima` (the pairs' other reduction); the few scored
    elements that are nobody's neighbour (CoDeGraph's excluded) get theirs from `element_minima`
    against the queries (as extra padded collections they would cost as many products as the
    base: measured 1.8x the products on the phantom cohort)."""
    q, (n, m) = len(query_valid), neighbours.shape
    row_of = torch.full(minima.valid.shape, -1, dtype=torch.long)  # (total, M) row of each element in `minima`
    row_of[minima.valid] = torch.arange(len(minima.owner))
    rows = torch.full((n, m), -1, dtype=torch.long)
    rows[neighbours.any(1)] = row_of[q:]
    is_neighbour = neighbours[update.scored]
    new = torch.full((len(is_neighbour), q), torch.inf)
    new[is_neighbour] = minima.distances[rows[neighbours], :q]
    alone = update.scored & ~neighbours
    if bool(alone.any()):
        everyone = as_layers([torch.cat([qu.to(b.device), b]) for qu, b in zip(queries, bases)])
        valid = torch.cat([query_valid, update.scored])
        index = torch.full(valid.shape, -1, dtype=torch.long)
        index[valid] = torch.arange(int(valid.sum()))
        partners = torch.zeros(q + n, q + n, dtype=torch.bool)
        partners[:q, q:] = True
        partners[q:, :q] = True
        new[~is_neighbour] = element_minima(everyone, valid, index[q:][alone], partners=partners, options=options)[:, :q]
    pooled = torch.cat([update.minima, new], 1).topk(k, dim=1, largest=False, sorted=True).values
    if squared:
        pooled = pooled.square()
    scores = torch.full((n, m), torch.nan)
    scores[update.scored] = smallest_mean(pooled, torch.full((len(pooled),), k, dtype=torch.long))
    return scores


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
    base_minima: Sequence[Tensor] | None = None,
) -> ReferenceResult:
    """`score_collections` for query collections against a reference batch.

    `query_layers` (q, *grid, C_l) and `base_layers` (N, *grid, C_l), one per backbone layer;
    `query_valid` (q, *grid) / `base_valid` (N, *grid) bool; `excluded` (N, *grid) bool: the
    reference's CoDeGraph exclusions (method "codegraph"; None = nothing excluded). LNAMD views
    as `score_collections` builds them (each collection's own LayerNorm), scored per view at
    `method_top_fraction` (MuSc's f, or CoDeGraph's final-pass f on the refined base), then averaged.
    `base_minima`: per view (T, K) the reference's kept minima of its valid elements
    (`ScoringResult.kept_minima`): the reference collections' scores are then updated too
    (`reference_mutual_update`; not with `independent`).
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
    top_fraction = method_top_fraction(config, method)
    squared = method == "codegraph" and config.codegraph.squared
    n_views = len(base_layers) * len(config.lnamd_radii)
    if base_minima is not None and (independent or len(base_minima) != n_views):
        raise VolscanError(f"base_minima: expected {n_views} views of kept minima and not independent, "
                           f"got {len(base_minima)}" + (" with independent" if independent else ""))
    views = zip(
        lnamd_views(list(query_layers), query_valid, config.lnamd_radii, config.layer_norm, border=config.lnamd_border),
        lnamd_views(list(base_layers), base_valid, config.lnamd_radii, config.layer_norm, border=config.lnamd_border),
    )
    total, base_total = torch.zeros(q, m), torch.zeros(n, m)
    for view, (query_view, base_view) in enumerate(views):
        if base_minima is None:
            total += reference_mutual_scores(
                query_view, base_view, top_fraction, query_valid.reshape(q, m), neighbours.reshape(n, m),
                independent=independent, squared=squared, options=config.engine,
            )
            continue
        scores, base_scores = reference_mutual_update(
            query_view, base_view, top_fraction, base_minima[view], query_valid.reshape(q, m), neighbours.reshape(n, m),
            base_scored=base_valid.reshape(n, m), squared=squared, options=config.engine,
        )
        total += scores
        base_total += base_scores
    element_scores = (total / n_views).reshape(q, *grid)
    return ReferenceResult(
        element_scores=element_scores,
        collection_scores=_peaks(element_scores.reshape(q, m)),
        method=method,
        independent=independent,
        reference_scores=None if base_minima is None else _peaks(base_total / n_views),
    )


def _peaks(scores: Tensor) -> Tensor:
    """(C,) max over the valid (non-NaN) elements of (C, M) scores."""
    return scores.nan_to_num(-torch.inf).amax(1)
