"""CoDeGraph: stop consistent anomalies from vouching for each other.

A *consistent* anomaly (the same anomalous pattern in a few collections) finds close
look-alikes in those few collections, so top-k mutual scoring calls it normal. Its sorted
mutual-distance vector "burns out": small for the first few ranks, then a jump. CoDeGraph turns
such links into a graph of collections, finds unusually dense communities with Leiden/CPM, and
removes their anomalous elements from the base of neighbours before the final mutual scoring.

Hyper-parameters the sources do not pin down, and why we chose these defaults:

- `reference_fraction = 0.5`: reference rank `r_ref = round(0.5 (N-1))`, the middle of the
  paper's 30-70 % range: far beyond any minority group's burn-out, well inside the normal regime.
- `eps = 0.1` and the weighted ratio `w(x, i) = d_(i)(x)^(1 - eps) / d_(r_ref)(x)`, i.e. the
  endurance ratio `d_(i) / d_(r_ref)` times the inverse-distance factor `d_(i)^(-eps)`. A small
  eps only breaks near-ties in favour of links with a larger absolute distance (more likely
  anomalous); distances are floored at `1e-8` so duplicates cannot divide by zero.
- `coverage = 0.95`: links are added (cheapest weighted ratio first, `link_batch` at a time) until
  95 % of collections touch a suspicious link. High enough that every collection can be judged
  by the community detection, low enough that a few isolated collections do not force the graph
  to swallow nearly every link. The batch loop is computed in closed form: coverage first
  reaches the target at the `ceil(coverage N)`-th smallest per-collection minimum link value,
  rounded up to a whole batch.
- `link_batch = 64` links: granularity of the growth; it only moves the stop by less than one
  batch, and 64 is small next to the hundreds (tests) to millions (3D cohorts) of links a graph
  takes, so results hardly depend on it.
- `resolution_quantile = 0.25`: CPM resolution = 25th percentile of edge weights (paper).
- `iqr_k = 3.0`: outlier communities have density > Q3 + 3 IQR (paper: robust from 1.5 up; 3 is
  the classic "far out" fence, so normal batches flag nothing). Densities are internal weight per
  node pair of communities with at least 2 collections (a single collection cannot be a
  *consistent* anomaly, and 0-density singletons would collapse the quartiles). Two robustness
  details of ours: each community is judged against the quartiles of the *other* communities
  (with few communities an anomalous one would otherwise inflate its own Q3), and the IQR is
  floored at `sqrt(max(Q3, 1))`: densities are link counts, whose Poisson noise is about the
  square root of the count, and without the floor a batch where most communities share one
  count (IQR = 0) would flag any community one link denser.
- `dependency_percentile = 99.0`: an element of an outlier community is excluded when its
  dependency ratio (score without the community / score with it) exceeds the 99th percentile of
  the same ratio outside the community, i.e. at most about 1 % false exclusions per community.
- `top_fraction = 0.1`: CoDeGraph's f for mutual scoring (paper).

Exclusion reuses the stored distances: each `d(x, J)` remembers the position of its nearest
element in `J`; entries whose nearest element is excluded are masked out (if fewer than k
entries survive, masked entries count as the element's largest stored distance).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import igraph
import leidenalg
import torch
from torch import Tensor

from volumetric.engine.distances import CollectionMinima, collection_minima
from volumetric.engine.mutual import smallest_mean, top_k_counts
from volumetric.engine.partners import global_features as mean_token_features
from volumetric.engine.partners import plan_pairs
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.errors import VolscanError

logger = logging.getLogger(__name__)

DISTANCE_FLOOR = 1e-8


@dataclass(frozen=True)
class CoDeGraphResult:
    """Outcome of CoDeGraph on one batch (tensors on CPU).

    `scores` (N, M) float32 final scores (NaN at void); `mutual_scores` (N, M) the plain mutual
    scores with the same f, before exclusion; `excluded` (N, M) bool elements removed from the
    base; `graph` undirected igraph.Graph, one vertex per collection, edge attribute "weight" =
    number of suspicious links; `communities` lists of collection indices (largest first);
    `outlier_communities` indices into `communities`; `densities` per community (internal weight
    per node pair, 0 for singletons); `density_fences` the density above which each community
    is an outlier (inf for singletons); `reference_rank` r_ref
    (1-based); `suspicious_links` number of links in the graph.
    """

    scores: Tensor
    mutual_scores: Tensor
    excluded: Tensor
    graph: igraph.Graph
    communities: list[list[int]]
    outlier_communities: list[int]
    densities: list[float]
    density_fences: list[float]
    reference_rank: int
    suspicious_links: int
    valid: Tensor = field(repr=False)

    @property
    def excluded_fraction(self) -> float:
        """Share of valid elements excluded from the base."""
        return float(self.excluded.sum()) / max(1, int(self.valid.sum()))

    @property
    def edges(self) -> list[tuple[int, int, float]]:
        """(collection, collection, weight) for every graph edge."""
        return [(e.source, e.target, float(e["weight"])) for e in self.graph.es]

    @property
    def outlier_collections(self) -> list[int]:
        """Sorted indices of collections in outlier communities."""
        return sorted(i for c in self.outlier_communities for i in self.communities[c])

    def summary(self) -> dict:
        """JSON-ready facts for a report."""
        return {
            "excluded_fraction": self.excluded_fraction,
            "excluded_per_collection": self.excluded.sum(1).tolist(),
            "reference_rank": self.reference_rank,
            "suspicious_links": self.suspicious_links,
            "communities": self.communities,
            "densities": self.densities,
            "outlier_communities": self.outlier_communities,
            "density_fences": [f if math.isfinite(f) else None for f in self.density_fences],
            "edges": self.edges,
        }


@dataclass(frozen=True)
class CoDeGraph:
    """CoDeGraph hyper-parameters (defaults and reasons in the module docstring).

    Call it on features (one (N, M, C) tensor, or an iterable of views such as layers or
    (layer, LNAMD r) pairs, each (N, M, C_v)) and an optional (N, M) bool `valid` mask.
    """

    top_fraction: float = 0.1
    reference_fraction: float = 0.5
    eps: float = 0.1
    coverage: float = 0.95
    link_batch: int = 64
    resolution_quantile: float = 0.25
    iqr_k: float = 3.0
    dependency_percentile: float = 99.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("top_fraction", self.top_fraction)
        check_fraction("reference_fraction", self.reference_fraction)
        check_fraction("coverage", self.coverage)
        check_fraction("resolution_quantile", self.resolution_quantile)
        if not 0.0 <= self.eps < 1.0:
            raise VolscanError(f"eps: must be in [0, 1), got {self.eps!r}")
        if not isinstance(self.link_batch, int) or self.link_batch < 1:
            raise VolscanError(f"link_batch: must be a positive integer, got {self.link_batch!r}")
        if self.iqr_k < 0:
            raise VolscanError(f"iqr_k: must be >= 0, got {self.iqr_k!r}")
        if not 0.0 < self.dependency_percentile <= 100.0:
            raise VolscanError(f"dependency_percentile: must be in (0, 100], got {self.dependency_percentile!r}")

    def reference_rank(self, n: int) -> int:
        """1-based r_ref for a batch of n collections (at least 2, at most n - 1)."""
        return min(n - 1, max(2, round(self.reference_fraction * (n - 1))))

    def __call__(
        self,
        features: Tensor | Iterable[Tensor],
        valid: Tensor | None = None,
        *,
        preselect_fraction: float | None = None,
        global_features: Tensor | None = None,
        device: str | torch.device | None = None,
        half: bool = False,
        block_mb: float = 256.0,
        progress: bool = True,
    ) -> CoDeGraphResult:
        """Score a batch. Views may be a lazy iterable (only their distances are kept).

        `preselect_fraction` / `global_features` (N, D): pair pre-selection (default global
        feature: mean valid token of the first view); `device`, `half`, `block_mb` as in
        `mutual_scores`.
        """
        views = iter([features] if isinstance(features, Tensor) else features)
        minima: list[CollectionMinima] = []
        partners = None
        for index, view in enumerate(views):
            if not isinstance(view, Tensor):
                raise VolscanError(f"features view {index}: expected a tensor (N, M, C), got {type(view).__name__}")
            (view,) = as_layers(view, name=f"features view {index}")
            if not minima:
                n, m = view.shape[:2]
                _require_three(n)
                valid = as_valid(valid, n, m)
                partners = self._partners(view, valid, preselect_fraction, global_features)
            elif view.shape[:2] != (n, m):
                raise VolscanError(f"features view {index}: shape {tuple(view.shape)} does not match (N, M) = {(n, m)}")
            minima.append(
                collection_minima(
                    [view], valid, partners=partners, nearest=True, device=device, half=half,
                    block_mb=block_mb, progress=progress,
                )
            )
        if not minima:
            raise VolscanError("features: no view given")
        return self.refine(minima)

    def _partners(
        self, view: Tensor, valid: Tensor, preselect_fraction: float | None, global_features: Tensor | None
    ) -> Tensor:
        n = view.shape[0]
        globals_ = None
        if preselect_fraction is not None:
            globals_ = mean_token_features([view], valid) if global_features is None else global_features
        return plan_pairs(
            n, preselect_fraction=preselect_fraction, globals_=globals_, min_partners=self.reference_rank(n)
        ).partners

    def refine(self, minima: Sequence[CollectionMinima]) -> CoDeGraphResult:
        """Graph, communities, exclusion and final scores from per-view stored minima
        (each computed with `nearest=True` on the same batch and mask)."""
        first = minima[0]
        n = first.valid.shape[0]
        _require_three(n)
        k = top_k_counts(torch.full((n,), n), self.top_fraction)[first.owner]
        averaged = sum(v.distances for v in minima) / len(minima)
        r_ref = self.reference_rank(n)
        graph, links = self._graph(averaged, first.owner, n, r_ref)
        communities, densities = self._communities(graph)
        outliers, fences = self._outliers(communities, densities)
        excluded_flat = self._exclude(averaged, first.owner, k, [communities[c] for c in outliers])
        excluded = first.to_grid(excluded_flat, False)
        musc = sum(smallest_mean(v.distances, k) for v in minima) / len(minima)
        final = sum(smallest_mean(_mask_excluded(v, excluded), k) for v in minima) / len(minima)
        logger.info(
            "CoDeGraph: %d links, %d communities, %d outlier(s), %.2f %% elements excluded",
            links, len(communities), len(outliers), 100.0 * float(excluded_flat.float().mean()),
        )
        return CoDeGraphResult(
            scores=first.to_grid(final, torch.nan),
            mutual_scores=first.to_grid(musc, torch.nan),
            excluded=excluded,
            graph=graph,
            communities=communities,
            outlier_communities=outliers,
            densities=densities,
            density_fences=fences,
            reference_rank=r_ref,
            suspicious_links=links,
            valid=first.valid,
        )

    def _graph(self, distances: Tensor, owner: Tensor, n: int, r_ref: int) -> tuple[igraph.Graph, int]:
        """Collection graph from the most suspicious links (weighted endurance ratio)."""
        ordered, partner = distances.sort(dim=1)
        if bool(torch.isinf(ordered[:, r_ref - 1]).any()):
            raise VolscanError(f"CoDeGraph needs {r_ref} partner collections per element; pre-select more")
        ranked = ordered[:, : r_ref - 1].clamp_min(DISTANCE_FLOOR)
        reference = ordered[:, r_ref - 1 : r_ref].clamp_min(DISTANCE_FLOOR)
        ratio = ranked.pow_(1.0 - self.eps).div_(reference)  # (T, r_ref - 1)
        target = partner[:, : r_ref - 1].flatten()
        del ordered, partner
        first_link = torch.full((n,), torch.inf)
        first_link.scatter_reduce_(0, owner, ratio.amin(1), "amin")
        ratio = ratio.flatten()
        first_link.scatter_reduce_(0, target, ratio, "amin")
        cutoff = first_link.kthvalue(math.ceil(self.coverage * n)).values
        count = int((ratio <= cutoff).sum())
        count = min(len(ratio), math.ceil(count / self.link_batch) * self.link_batch)
        chosen = ratio.topk(count, largest=False).indices
        source, target = owner[chosen // (r_ref - 1)], target[chosen]
        pair = torch.minimum(source, target) * n + torch.maximum(source, target)
        weights = torch.bincount(pair, minlength=n * n)
        edges = weights.nonzero().flatten()
        graph = igraph.Graph(n=n, edges=torch.stack([edges // n, edges % n], 1).tolist())
        graph.es["weight"] = weights[edges].double().tolist()
        return graph, count

    def _communities(self, graph: igraph.Graph) -> tuple[list[list[int]], list[float]]:
        """Leiden/CPM communities (largest first) and their densities."""
        if graph.ecount() == 0:
            return [[v] for v in range(graph.vcount())], [0.0] * graph.vcount()
        resolution = float(torch.tensor(graph.es["weight"]).quantile(self.resolution_quantile))
        partition = leidenalg.find_partition(
            graph, leidenalg.CPMVertexPartition, weights="weight", resolution_parameter=resolution, seed=self.seed
        )
        communities = sorted((sorted(c) for c in partition), key=lambda c: (-len(c), c))
        densities = []
        for members in communities:
            pairs = len(members) * (len(members) - 1) / 2
            internal = sum(graph.subgraph(members).es["weight"]) if pairs else 0.0
            densities.append(internal / pairs if pairs else 0.0)
        return communities, densities

    def _outliers(self, communities: list[list[int]], densities: list[float]) -> tuple[list[int], list[float]]:
        """Communities (>= 2 collections) denser than Q3 + k * spread of the *other* such
        communities; spread = max(IQR, sqrt(max(Q3, 1))). Returns outlier indices and fences
        (inf for singletons)."""
        groups = [i for i, c in enumerate(communities) if len(c) >= 2]
        fences = [math.inf] * len(communities)
        for i in groups:
            others = [densities[j] for j in groups if j != i] or [0.0]
            q1, q3 = torch.tensor(others, dtype=torch.float64).quantile(
                torch.tensor([0.25, 0.75], dtype=torch.float64)
            ).tolist()
            fences[i] = q3 + self.iqr_k * max(q3 - q1, math.sqrt(max(q3, 1.0)))
        return [i for i in groups if densities[i] > fences[i]], fences

    def _exclude(self, distances: Tensor, owner: Tensor, k: Tensor, groups: list[list[int]]) -> Tensor:
        """(T,) bool: elements of outlier communities that depend on their community."""
        excluded = torch.zeros(len(owner), dtype=torch.bool)
        if not groups:
            return excluded
        before = smallest_mean(distances, k).clamp_min(DISTANCE_FLOOR)
        for members in groups:
            inside = torch.isin(owner, torch.tensor(members))
            if bool(inside.all()):
                continue
            without = distances.clone()
            without[:, members] = torch.inf
            ratio = smallest_mean(without, k) / before
            threshold = ratio[~inside].quantile(self.dependency_percentile / 100.0)
            excluded |= inside & (ratio > threshold)
        return excluded


def _require_three(n: int) -> None:
    if n < 3:
        raise VolscanError(f"CoDeGraph needs at least 3 collections (a reference rank beyond the links), got {n}")


def _mask_excluded(minima: CollectionMinima, excluded: Tensor) -> Tensor:
    """(T, N) distances where entries whose nearest element is excluded count as the element's
    largest stored distance (so they are used only when fewer than k entries survive)."""
    nearest = minima.nearest.long()
    hit = (nearest >= 0) & excluded.flatten()[torch.arange(excluded.shape[0]) * excluded.shape[1] + nearest.clamp_min(0)]
    if not bool(hit.any()):
        return minima.distances
    finite = minima.distances.masked_fill(torch.isinf(minima.distances), -torch.inf)
    worst = finite.amax(dim=1, keepdim=True)
    return torch.where(hit, worst.expand_as(minima.distances), minima.distances)
