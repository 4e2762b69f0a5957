"""Mutual scoring (MuSc): score each element by its look-alikes in the *other* collections.

`score(x) = mean of the k smallest d(x, J)` over collections `J != I`, `k = max(1, floor(f (n-1)))`
with `n` the batch size (the subset size when the batch is split), Euclidean distances.
Distances come from `volumetric.engine.distances` (blocked, each pair of collections once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from volumetric.engine.distances import CollectionMinima
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import global_features as mean_token_features
from volumetric.engine.partners import plan_pairs
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.engine.window import scoped_element_minima, scoped_minima


@dataclass(frozen=True)
class MutualDistances:
    """Mutual scores plus the sorted mutual-similarity vectors behind them (all on CPU).

    `scores` (N, M) float32, NaN at invalid elements. `sorted_distances` (N, M, N-1) float32
    ascending `d_(1..N-1)(x)`; NaN at invalid elements, +inf for pairs that were not computed
    (other subset, not pre-selected). `collections` (N, M, N-1) int64: the collection behind each
    entry (-1 where +inf or invalid). `nearest` (N, M, N-1) int64 or None: position of the nearest
    element inside that collection (single-layer input only; -1 where no entry). `top_k` (N,)
    int64: the k used for each collection.
    """

    scores: Tensor
    sorted_distances: Tensor
    collections: Tensor
    nearest: Tensor | None
    top_k: Tensor


@dataclass(frozen=True)
class ScoresWithMinima:
    """`scores` (N, M) float32 mutual scores (NaN at void) and `smallest` (T, K) float32: each
    valid element's K smallest `d(x, J)` ascending (elements ordered collection by collection,
    position by position; +inf past its partners), what reference scoring needs to update the
    scores when collections join the batch (`volumetric.engine.reference`)."""

    scores: Tensor
    smallest: Tensor


def smallest_minima(distances: Tensor, keep: int) -> Tensor:
    """(T, keep) ascending smallest entries of each row of `distances` (T, N), +inf past N."""
    head = distances.topk(min(keep, distances.shape[1]), dim=1, largest=False, sorted=True).values
    if head.shape[1] < keep:
        head = torch.cat([head, torch.full((len(head), keep - head.shape[1]), torch.inf)], 1)
    return head


def top_k_counts(batch_size: Tensor, top_fraction: float) -> Tensor:
    """k = max(1, floor(f * (n - 1))) per collection; `batch_size` (N,) int64."""
    return torch.clamp(torch.floor(top_fraction * (batch_size - 1).double()).long(), min=1)


def smallest_mean(distances: Tensor, k: Tensor) -> Tensor:
    """Mean of the `k[t]` smallest entries of each row of `distances` (T, K) -> (T,) float32.

    Rows with fewer than `k` finite entries give +inf (callers decide what that means).
    """
    kmax = int(k.max())
    smallest = distances.topk(min(kmax, distances.shape[1]), dim=1, largest=False).values
    running = smallest.double().cumsum(1)
    return (running.gather(1, (k - 1).unsqueeze(1)).squeeze(1) / k).float()


def minima_scores(minima: CollectionMinima, k: Tensor) -> Tensor:
    """(N, M) float32 mutual scores from stored minima; `k` (N,) per collection; NaN at void."""
    return minima.to_grid(smallest_mean(minima.distances, k[minima.owner]), torch.nan)


# Per collection at least this many candidates for its peak: with small collections a share
# would be 1 element, and a bf16 near-tie then keeps the true maximum out (measured: 1 of 12
# random batches of 10 x ~63 elements).
PEAK_CANDIDATES = 8
# The batch's exact top share comes from RANK_MARGIN x that share of bf16's highest: bf16 moves
# ranks near the cut (3D-like benchmark, 1 % from 1 %: agreement 0.982; from 2 %: 1.000).
RANK_MARGIN = 2.0


def highest_elements(
    scores: Tensor, counts: Tensor, share: float, among: Tensor | None = None, batch_margin: float = 1.0
) -> Tensor:
    """Sorted unique indices of the `ceil(batch_margin share E)` highest of `scores` (T,) and of
    the `max(ceil(share e_j), PEAK_CANDIDATES)` highest of each collection j (at most e_j), where
    E / e_j count the eligible elements (all, or those where `among` (T,) bool is True).
    `counts` (N,) int64: elements per collection (scores are ordered collection by collection).
    Ineligible and NaN elements come last."""
    eligible = torch.ones_like(scores, dtype=torch.bool) if among is None else among
    keys = scores.nan_to_num(-torch.inf, torch.inf, -torch.inf).masked_fill(~eligible, -torch.inf)
    total = int(eligible.sum())
    chosen = [keys.topk(min(total, math.ceil(batch_margin * share * total))).indices]
    start = 0
    for stop in torch.cumsum(counts, 0).tolist():
        group_size = int(eligible[start:stop].sum())
        if group_size:
            most = min(group_size, max(math.ceil(share * group_size), PEAK_CANDIDATES))
            chosen.append(keys[start:stop].topk(most).indices + start)
        start = stop
    return torch.unique(torch.cat(chosen))


def elements_to_refine(minima: CollectionMinima, k: Tensor, share: float, among: Tensor | None = None) -> Tensor:
    """Sorted indices (E,) of the elements `refine_highest` recomputes: `highest_elements` of the
    scores from `minima` (`k` (N,) per collection) with `share`, the batch part widened by
    RANK_MARGIN; `among` (T,) bool restricts the choice."""
    scores = smallest_mean(minima.distances, k[minima.owner])
    return highest_elements(scores, minima.valid.sum(1), share, among, RANK_MARGIN)


def refine_highest(
    layers: Sequence[Tensor],
    minima: CollectionMinima,
    k: Tensor,
    *,
    partners: Tensor | None,
    options: EngineOptions,
    among: Tensor | None = None,
    grid: Sequence[int] | None = None,
) -> Tensor:
    """Reduced precision made exact where it matters, in place: the distances of the
    highest-scoring elements (`elements_to_refine` with `options.exact_top`) to every partner
    collection are recomputed in fp32.

    `minima` from `collection_minima` on these `layers`; `k` (N,) per collection; `among` (T,)
    bool restricts the choice (e.g. to the collections a caller scores); `grid` the shape of the
    M positions (with `options.window`: the refinement keeps the window). Returns the refined
    element indices (E,) (empty where the products already were fp32 or exact_top = 0). Exact
    per call: scores averaged over several calls (views) are exact where every call refined the
    element. Nearest positions, where kept, stay those of the reduced-precision pass (a near-tie
    may name another element).
    """
    if minima.precision == "fp32" or options.exact_top == 0 or minima.distances.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    chosen = elements_to_refine(minima, k, options.exact_top, among)
    minima.distances[chosen] = scoped_element_minima(
        layers, minima.valid, chosen, grid=grid, partners=partners, options=options
    )
    return chosen


def mutual_scores(
    features: Tensor | Sequence[Tensor],
    top_fraction: float = 0.1,
    valid: Tensor | None = None,
    *,
    return_vectors: bool = False,
    global_features: Tensor | None = None,
    options: EngineOptions | None = None,
    grid: Sequence[int] | None = None,
    keep: int = 0,
) -> Tensor | MutualDistances | ScoresWithMinima:
    """Mutual scores of every element of a batch.

    `features`: (N, M, C) float tensor, or a sequence of them (one per layer; the distances
    `d(x, J)` are averaged over layers before sorting). `top_fraction` f in (0, 1].
    `valid`: (N, M) bool; invalid elements are neither scored (NaN) nor anyone's neighbour.
    `global_features` (N, D): for pre-selection (default: the mean valid token).
    `options`: device, precision, block size, progress and the pair plan (`subsets`,
    `preselect_fraction`, `seed`; see `volumetric.engine.partners`) and `window`, which needs
    `grid`: the shape of the M positions (e.g. (16, 16, 16)). Returns (N, M) float32
    scores, or `MutualDistances` when `return_vectors` is True, or, `keep` > 0,
    `ScoresWithMinima` with each element's `keep` smallest minima (the scores are the same).
    """
    layers = as_layers(features)
    n, m = layers[0].shape[:2]
    valid = as_valid(valid, n, m)
    check_fraction("top_fraction", top_fraction)
    options = EngineOptions() if options is None else options
    batch_size = plan_pairs(n, subsets=options.subsets, seed=options.seed).batch_size
    k = top_k_counts(batch_size, top_fraction)
    globals_ = None
    if options.preselect_fraction is not None:
        globals_ = mean_token_features(layers, valid) if global_features is None else global_features
    plan = plan_pairs(
        n,
        subsets=options.subsets,
        preselect_fraction=options.preselect_fraction,
        globals_=globals_,
        min_partners=int(k.max()),
        seed=options.seed,
    )
    minima = scoped_minima(
        layers, valid, grid=grid, partners=plan.partners, nearest=return_vectors and len(layers) == 1,
        options=options,
    )
    refine_highest(layers, minima, k, partners=plan.partners, options=options, grid=grid)
    scores = minima_scores(minima, k)
    if keep and not return_vectors:
        return ScoresWithMinima(scores=scores, smallest=smallest_minima(minima.distances, keep))
    if not return_vectors:
        return scores
    values, order = minima.distances.sort(dim=1)
    values, order = values[:, : n - 1], order[:, : n - 1]
    missing = torch.isinf(values)
    nearest = None
    if minima.nearest is not None:
        nearest = minima.to_grid(minima.nearest.gather(1, order).long().masked_fill_(missing, -1), -1)
    return MutualDistances(
        scores=scores,
        sorted_distances=minima.to_grid(values, torch.nan),
        collections=minima.to_grid(order.masked_fill(missing, -1), -1),
        nearest=nearest,
        top_k=k,
    )
