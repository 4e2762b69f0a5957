"""CoDeGraph: stop consistent anomalies from vouching for each other (dissertation ch. 3).

A *consistent* anomaly (one anomalous pattern in a few collections) finds close look-alikes in
those few collections, so top-k mutual scoring calls it normal. Its sorted mutual similarity
vector "burns out": small for the first ranks, then a jump once the look-alikes are used up.
CoDeGraph turns the most burnt-out links into a graph of collections, finds unusually dense
communities (Leiden/CPM), removes their dependent elements from the base of neighbours, and
scores again. Stages (fields of `CoDeGraph`; defaults and their evidence: docs/engine.md,
"CoDeGraph", with links to the studies under docs/results/):

1. Reference rank `r_ref = round(reference_fraction N)`, 0.3: the paper's ablation row that
   reproduces its main table.
2. Weighted endurance ratio `w(x, i) = d_(i)^(1-eps) / d_(r_ref)` for ranks `i < r_ref` (eq. 3.4),
   `eps` = 0.1 (value lost: small, it only breaks near-ties).
3. Multi-layer graph (§3.2, `graph="layerwise"`): sorted mutual similarity vectors averaged over
   graph views; a link at rank i adds one connection to the i-th nearest collection of each view.
4. Link selection (Algorithm 1): links cheapest first, `link_batch` = 64 at a time, until
   `coverage` (1.0) of the collections touch one; computed in closed form (the ceil(coverage N)-th
   smallest per-collection first-link value, rounded up to a whole batch). `stop_fence` = 1.5:
   a collection's need (the links up to its first one) above Q3 + 1.5 IQR of all N needs does
   not count, so one collection with a whole-scan artefact (no close look-alike) cannot set the
   link budget (`None`: the literal rule).
5. Communities: Leiden, CPM, resolution = 25th percentile of edge weights; density = internal
   connection strength `2 W_in / n` (`density="strength"`; "pair" = `W_in` per node pair).
   Single collections are never outliers (one scan cannot be a *consistent* anomaly).
6. Outliers: Tukey over communities of >= 2 collections, density > Q3 + `iqr_k` IQR (3.0), the
   IQR floored at `min_spread` = 1 connection (a small community's density comes in whole
   connections; with IQR = 0 any slightly denser community would be flagged).
   Diffuse communities (`max_dependent_share` = 0.8; a departure from the paper, whose known limit
   is a normal variant rarer than r_ref): a community whose dependent elements (step 7, the
   community filtered alone) exceed 0.8 of its members' valid elements differs from the cohort
   everywhere, as a subgroup of atrophic healthy scans or one scanner's scans do, not in a focal
   anomaly; it is set aside: neither filtered nor counted in the fence's quartiles (its outsized
   density would lift the fence over a focal group). Probed: communities denser than the third
   quartile of those not set aside, again after each one is set aside. `None`: every community
   above the fence is filtered.
7. Targeted filtering (Algorithm 2, eq. 3.8): outlier communities largest first against the
   *current* base; an element leaves the base when its dependency ratio (score without the
   community / score) exceeds the `dependency_percentile` (99) of the ratio outside it. Read from
   the stored top-r_ref lists: removed entries skipped, missing ones count as d_(r_ref).
8. Final score (eq. 3.10): mutual scoring at f = 0.1 on the refined base, an exact second pass
   over the distances with the exclusion mask (`volumetric.engine.ranked`); plain Euclidean
   (`squared=False`, MuSc's code) unless `squared=True` (eq. 3.9). With nothing excluded the
   scores are the first pass's mutual scores at that f. Open choices, off by default (not chosen
   on the development split): `final_fraction` (the final pass's f, None = `top_fraction`) and
   `unflagged_fraction` (the f of the scores when nothing is excluded, e.g. MuSc's 0.3).

Memory grows with T * r_ref (T = valid elements): per graph view the r_ref nearest collections
with positions; other views keep only k. `options.memory_mb` bounds it (error naming `subsets`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import igraph
import leidenalg
import torch
from torch import Tensor

from volumetric.engine.mutual import smallest_minima, top_k_counts
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import global_features as mean_token_features
from volumetric.engine.partners import plan_pairs
from volumetric.engine.ranked import BYTES_PER_MB, Ranked, index_dtype, ranked_bytes, ranked_minima
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.engine.window import scoped_minima
from volumetric.errors import VolscanError

logger = logging.getLogger(__name__)

DISTANCE_FLOOR = 1e-8
GRAPHS = ("layerwise", "averaged")
FENCES = ("tukey", "robust")
DENSITIES = ("strength", "pair")
FILTERINGS = ("sequential", "independent")
ROW_CHUNK = 1 << 16

Views = Tensor | Sequence[Tensor] | Callable[[], Iterable[Tensor]]


@dataclass(frozen=True)
class CoDeGraphResult:
    """Outcome of CoDeGraph on one batch (tensors on CPU).

    `scores` (N, M) float32 final scores (NaN at void); `mutual_scores` (N, M) plain mutual scores
    with the same f before exclusion (Euclidean); `excluded` (N, M) bool elements removed from
    the base; `graph` undirected igraph.Graph, one vertex per collection, edge attribute "weight"
    = number of connections; `communities` lists of collection indices (largest first);
    `outlier_communities` indices into `communities`; `densities` per community
    (`CoDeGraph.density`: mean internal weighted degree, or weight per node pair; 0 for
    singletons); `density_fences` the density above which a community is an outlier (inf for
    singletons); `reference_rank` r_ref (1-based); `suspicious_links` links
    selected; `graph_views` views whose neighbours make the connections (links x graph_views =
    total edge weight); `diffuse_communities` communities above the fence whose dependent
    elements exceed `CoDeGraph.max_dependent_share` of their valid elements (not filtered, not in
    `outlier_communities`); `dependent_shares` community index -> share of its members' valid
    elements that targeted filtering found dependent, for every community probed (denser than the
    third quartile of those not set aside); `kept_minima` per view (T, K) float32: each valid
    element's K smallest distances of the final pass (on the refined base), when `keep` asked for
    them.
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
    graph_views: int
    valid: Tensor = field(repr=False)
    diffuse_communities: list[int] = field(default_factory=list)
    dependent_shares: dict[int, float] = field(default_factory=dict)
    kept_minima: tuple[Tensor, ...] = field(default=(), repr=False)

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
            "graph_views": self.graph_views,
            "communities": self.communities,
            "densities": self.densities,
            "outlier_communities": self.outlier_communities,
            "diffuse_communities": self.diffuse_communities,
            "dependent_shares": {str(c): v for c, v in self.dependent_shares.items()},
            "density_fences": [f if math.isfinite(f) else None for f in self.density_fences],
            "edges": self.edges,
        }


@dataclass(frozen=True)
class CoDeGraph:
    """CoDeGraph hyper-parameters (defaults and evidence in the module docstring).

    Call it on views (one (N, M, C) tensor, a sequence of them, or a zero-argument callable
    returning a fresh iterable of them: views are read twice, one at a time) and an optional
    (N, M) bool `valid` mask.
    """

    top_fraction: float = 0.1
    reference_fraction: float = 0.3
    eps: float = 0.1
    coverage: float = 1.0
    link_batch: int = 64
    stop_fence: float | None = 1.5
    resolution_quantile: float = 0.25
    iqr_k: float = 3.0
    min_spread: float = 1.0
    density: str = "strength"
    dependency_percentile: float = 99.0
    squared: bool = False
    final_fraction: float | None = None
    unflagged_fraction: float | None = None
    max_dependent_share: float | None = 0.8
    graph: str = "layerwise"
    fence: str = "tukey"
    filtering: str = "sequential"
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("top_fraction", self.top_fraction)
        check_fraction("reference_fraction", self.reference_fraction)
        check_fraction("coverage", self.coverage)
        check_fraction("resolution_quantile", self.resolution_quantile)
        for name in ("final_fraction", "unflagged_fraction", "max_dependent_share"):
            if getattr(self, name) is not None:
                check_fraction(name, getattr(self, name))
        if not 0.0 <= self.eps < 1.0:
            raise VolscanError(f"eps: must be in [0, 1), got {self.eps!r}")
        if not isinstance(self.link_batch, int) or self.link_batch < 1:
            raise VolscanError(f"link_batch: must be a positive integer, got {self.link_batch!r}")
        if self.stop_fence is not None and not self.stop_fence >= 0:
            raise VolscanError(f"stop_fence: must be >= 0 or None, got {self.stop_fence!r}")
        if self.iqr_k < 0:
            raise VolscanError(f"iqr_k: must be >= 0, got {self.iqr_k!r}")
        if self.min_spread < 0:
            raise VolscanError(f"min_spread: must be >= 0, got {self.min_spread!r}")
        if not 0.0 < self.dependency_percentile <= 100.0:
            raise VolscanError(f"dependency_percentile: must be in (0, 100], got {self.dependency_percentile!r}")
        for name, allowed in (("graph", GRAPHS), ("fence", FENCES), ("density", DENSITIES), ("filtering", FILTERINGS)):
            if getattr(self, name) not in allowed:
                raise VolscanError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")

    def reference_rank(self, n: int) -> int:
        """1-based r_ref = round(reference_fraction N), at least 2, at most n - 1."""
        return min(n - 1, max(2, round(self.reference_fraction * n)))

    def __call__(
        self,
        features: Views,
        valid: Tensor | None = None,
        *,
        graph_views: Sequence[int] | None = None,
        global_features: Tensor | None = None,
        options: EngineOptions | None = None,
        grid: Sequence[int] | None = None,
        keep: int = 0,
    ) -> CoDeGraphResult:
        """Score a batch. `graph_views`: indices of the views whose neighbours build the graph
        (None = all). `global_features` (N, D): pre-selection feature (default: mean valid token
        of the first view). `options.subsets` must be 1 (`score_collections` splits batches).
        `grid`: the shape of the M positions (needed with `options.window`). `keep` K > 0: keep
        each element's K smallest distances of the final pass per view (`kept_minima`; the lists
        are ranked to max(rank, K), which leaves their first entries and so the scores unchanged)."""
        options = EngineOptions() if options is None else options
        if options.subsets != 1:
            raise VolscanError("subsets: CoDeGraph scores one batch; split batches with score_collections")
        fresh = _view_source(features)
        n = m = 0
        partners = k = r_ref = None
        graph_ranked: list[Ranked] = []
        full_minima: list[Tensor] = []
        musc, plain, count = None, None, 0
        kept: list[Tensor] = []
        for index, view in enumerate(fresh()):
            view = _check_view(view, index, (n, m) if index else None)
            if index == 0:
                n, m = view.shape[:2]
                _require_three(n)
                valid = as_valid(valid, n, m)
                k = int(top_k_counts(torch.tensor([n]), self.top_fraction))
                k_final = int(top_k_counts(torch.tensor([n]), self.final_fraction or self.top_fraction))
                # the scores used when nothing is excluded: mutual scores at `unflagged_fraction`
                k_plain = k_final
                if self.unflagged_fraction is not None:
                    k_plain = int(top_k_counts(torch.tensor([n]), self.unflagged_fraction))
                r_ref = self.reference_rank(n)
                partners = self._partners(view, valid, global_features, options, r_ref)
                if graph_views is None and not callable(features):  # every view builds the graph
                    graph_views = range(1 if isinstance(features, Tensor) else len(features))
                self._check_memory(valid, graph_views, options, r_ref, max(k, k_plain, keep))
            in_graph = graph_views is None or index in graph_views
            if in_graph and self.graph == "averaged":
                minima = scoped_minima([view], valid, grid=grid, partners=partners, options=options)
                full_minima.append(minima.distances)
                ascending = minima.distances.sort(1).values
            else:
                rank = max(r_ref if in_graph else k, k_plain, keep)
                ranked = ranked_minima(
                    view, valid, rank, partners=partners, nearest=in_graph, options=options, grid=grid
                )
                ascending = ranked.distances
                if in_graph:
                    graph_ranked.append(_first_ranks(ranked, r_ref))
            if keep:
                kept.append(smallest_minima(ascending, keep))
            view_scores = _mean_smallest(ascending[:, :k], k, False)
            musc = view_scores if musc is None else musc.add_(view_scores)
            if k_plain != k:
                view_plain = _mean_smallest(ascending[:, :k_plain], k_plain, False)
                plain = view_plain if plain is None else plain.add_(view_plain)
            del ascending
            count += 1
        if count == 0:
            raise VolscanError("features: no view given")
        if graph_views is not None and any(not 0 <= g < count for g in graph_views):
            raise VolscanError(f"graph_views: indices {list(graph_views)} out of range for {count} views")
        if full_minima:
            graph_ranked = [_ranked_from_full(sum(full_minima) / len(full_minima), r_ref)]
            del full_minima
        if not graph_ranked:
            raise VolscanError("graph_views: no view selected for the graph")
        musc /= count
        plain = musc if plain is None else plain / count
        owner = torch.repeat_interleave(torch.arange(n), valid.sum(1))

        graph, links = self._graph(graph_ranked, owner, n, r_ref)
        communities, densities = self._communities(graph)
        diffuse, dependent_shares = self._diffuse(graph_ranked, owner, k, m, valid, communities, densities)
        outliers, fences = self._outliers(communities, densities, diffuse)
        excluded_flat = self._exclude(graph_ranked, owner, k, m, valid, [communities[c] for c in outliers])
        connections = len(graph_ranked)
        del graph_ranked
        excluded = torch.zeros(n, m, dtype=torch.bool)
        excluded[valid] = excluded_flat
        if bool(excluded_flat.any()) or (self.squared and self.unflagged_fraction is None):
            final = self._final_scores(fresh, valid, excluded, partners, k_final, options, grid, keep, kept)
        else:
            final = plain
        logger.info(
            "CoDeGraph: r_ref %d, %d links x %d views, %d communities, %d outlier(s), %d diffuse, %.2f %% elements "
            "excluded", r_ref, links, connections, len(communities), len(outliers), len(diffuse),
            100.0 * float(excluded_flat.float().mean()),
        )
        return CoDeGraphResult(
            scores=_to_grid(final, valid),
            mutual_scores=_to_grid(musc, valid),
            excluded=excluded,
            graph=graph,
            communities=communities,
            outlier_communities=outliers,
            densities=densities,
            density_fences=fences,
            reference_rank=r_ref,
            suspicious_links=links,
            graph_views=connections,
            valid=valid,
            diffuse_communities=diffuse,
            dependent_shares=dependent_shares,
            kept_minima=tuple(kept),
        )

    def _partners(
        self, view: Tensor, valid: Tensor, global_features: Tensor | None, options: EngineOptions, r_ref: int
    ) -> Tensor:
        n = view.shape[0]
        globals_ = None
        if options.preselect_fraction is not None:
            globals_ = mean_token_features([view], valid) if global_features is None else global_features
        return plan_pairs(
            n, preselect_fraction=options.preselect_fraction, globals_=globals_, min_partners=r_ref
        ).partners

    def _check_memory(
        self, valid: Tensor, graph_views: Sequence[int] | None, options: EngineOptions, r_ref: int, k: int
    ) -> None:
        """Refuse, before any work, a batch whose kept lists exceed `options.memory_mb`."""
        if options.memory_mb is None:
            return
        n, m = valid.shape
        t = int(valid.sum())
        views = 1 if graph_views is None else max(1, len(graph_views))
        if self.graph == "averaged":
            need = 2 * t * n * 4 + ranked_bytes(t, n, m, r_ref, False)
        else:
            # kept lists, the (T, r_ref) ratio and its int64 link targets while the graph is built
            need = views * ranked_bytes(t, n, m, r_ref, True) + t * r_ref * 12 + ranked_bytes(t, n, m, k, False)
        need_mb = need / BYTES_PER_MB
        if need_mb > options.memory_mb:
            # per subset, elements and r_ref both shrink by s: memory by about s^2
            subsets = math.ceil(math.sqrt(need_mb / options.memory_mb))
            raise VolscanError(
                f"memory: CoDeGraph on {n} collections ({t} valid elements, r_ref {r_ref}, {views} graph view(s)) "
                f"keeps about {need_mb:.0f} MiB, over memory_mb={options.memory_mb:g}; split the batch with "
                f"subsets={subsets} (or more), build the graph from fewer views, or raise memory_mb "
                f"(pre-selection, preselect_fraction, saves time, not this memory)"
            )

    def _graph(self, ranked: list[Ranked], owner: Tensor, n: int, r_ref: int) -> tuple[igraph.Graph, int]:
        """Collection graph from the most suspicious links of the layer-averaged sorted vectors."""
        averaged = sum(r.distances[:, :r_ref] for r in ranked) / len(ranked)
        if bool(torch.isinf(averaged[:, r_ref - 1]).any()):
            raise VolscanError(f"CoDeGraph needs {r_ref} partner collections per element; pre-select more")
        reference = averaged[:, r_ref - 1 : r_ref].clamp_min(DISTANCE_FLOOR)
        ratio = averaged[:, : r_ref - 1].clamp_min_(DISTANCE_FLOOR).pow_(1.0 - self.eps).div_(reference)
        del averaged
        first_link = torch.full((n,), torch.inf)
        first_link.scatter_reduce_(0, owner, ratio.amin(1), "amin")
        flat = ratio.flatten()
        for r in ranked:
            first_link.scatter_reduce_(0, r.collections[:, : r_ref - 1].flatten().long(), flat, "amin")
        count = min(len(flat), math.ceil(self._stop(first_link, flat) / self.link_batch) * self.link_batch)
        chosen = flat.topk(count, largest=False).indices
        del ratio, flat
        rows, ranks = chosen // (r_ref - 1), chosen % (r_ref - 1)
        source = owner[rows]
        weights = torch.zeros(n * n, dtype=torch.int64)
        for r in ranked:
            target = r.collections[rows, ranks].long()
            pair = torch.minimum(source, target) * n + torch.maximum(source, target)
            weights += torch.bincount(pair, minlength=n * n)
        edges = weights.nonzero().flatten()
        graph = igraph.Graph(n=n, edges=torch.stack([edges // n, edges % n], 1).tolist())
        graph.es["weight"] = weights[edges].double().tolist()
        return graph, count

    def _stop(self, first_link: Tensor, flat: Tensor) -> int:
        """Links to select before rounding to a batch: enough that `coverage` of the collections
        touch one, counting only collections whose own need is not a far-out outlier.

        `first_link` (N,): each collection's cheapest link value; `flat`: every link value. A
        collection's need = the links cheaper than or equal to its first link (links added
        cheapest first until it is touched). Needs above Q3 + `stop_fence` IQR of all N needs
        (a scan with a global artefact finds no close look-alike anywhere, so its first link
        comes hundreds of links after everyone else's) do not hold the stop back; None = every
        collection counts (the literal Algorithm 1)."""
        boundaries = first_link.sort().values
        needs = torch.bincount(torch.bucketize(flat, boundaries), minlength=len(boundaries) + 1).cumsum(0)[:-1]
        counted = needs
        if self.stop_fence is not None:
            q1, q3 = _quartiles(needs.tolist())
            counted = needs[needs <= q3 + self.stop_fence * (q3 - q1)]
        return int(counted[min(len(counted), math.ceil(self.coverage * len(needs))) - 1])

    def _communities(self, graph: igraph.Graph) -> tuple[list[list[int]], list[float]]:
        """Leiden/CPM communities (largest first) and their densities."""
        if graph.ecount() == 0:
            return [[v] for v in range(graph.vcount())], [0.0] * graph.vcount()
        resolution = float(torch.tensor(graph.es["weight"]).quantile(self.resolution_quantile))
        partition = leidenalg.find_partition(
            graph, leidenalg.CPMVertexPartition, weights="weight", resolution_parameter=resolution, seed=self.seed
        )
        communities = sorted((sorted(c) for c in partition), key=lambda c: (-len(c), c))
        return communities, [community_density(graph, c, self.density) for c in communities]

    def _outliers(
        self, communities: list[list[int]], densities: list[float], aside: Sequence[int] = ()
    ) -> tuple[list[int], list[float]]:
        """Communities (>= 2 collections, not in `aside`) above the density fence drawn over the
        communities not set aside; returns indices and fences (inf for singletons)."""
        groups = [i for i, c in enumerate(communities) if len(c) >= 2]
        counted = [j for j in groups if j not in aside]
        fences = [math.inf] * len(communities)
        for i in groups:
            if self.fence == "tukey":
                fences[i] = tukey_fence([densities[j] for j in counted] or [0.0], self.iqr_k, self.min_spread)
            else:
                others = [densities[j] for j in counted if j != i] or [0.0]
                q1, q3 = _quartiles(others)
                fences[i] = q3 + self.iqr_k * max(q3 - q1, math.sqrt(max(q3, 1.0)))
        return [i for i in counted if densities[i] > fences[i]], fences

    def _exclude(
        self, ranked: list[Ranked], owner: Tensor, k: int, m: int, valid: Tensor, groups: list[list[int]]
    ) -> Tensor:
        """(T,) bool: elements of outlier communities that depend on their community."""
        n = valid.shape[0]
        excluded = torch.zeros(len(owner), dtype=torch.bool)
        if not groups:
            return excluded
        positions = valid.nonzero()[:, 1]
        for members in groups:
            inside = torch.isin(owner, torch.tensor(members))
            if bool(inside.all()):
                continue
            removed = torch.zeros(n, dtype=torch.bool)
            removed[members] = True
            base_out = torch.ones(n, m, dtype=torch.bool)
            if self.filtering == "sequential":
                base_out[owner[excluded], positions[excluded]] = False
            before = _base_scores(ranked, k, None, base_out).clamp_min_(DISTANCE_FLOOR)
            ratio = _base_scores(ranked, k, removed, base_out).div_(before)
            # reference: elements outside C still in the base (already excluded ones lost their
            # own look-alikes too, and would lift the threshold to theirs)
            reference = ~inside & ~excluded if self.filtering == "sequential" else ~inside
            threshold = ratio[reference].quantile(self.dependency_percentile / 100.0)
            excluded |= inside & (ratio > threshold)
        return excluded

    def _diffuse(
        self,
        ranked: list[Ranked],
        owner: Tensor,
        k: int,
        m: int,
        valid: Tensor,
        communities: list[list[int]],
        densities: list[float],
    ) -> tuple[list[int], dict[int, float]]:
        """Communities set aside as diffuse, and the dependent share of every community probed.

        A community whose dependent elements (targeted filtering of it alone) are more than
        `max_dependent_share` of its members' valid elements differs from the cohort everywhere
        (a normal anatomical variant, a site, a protocol), not in a focal anomaly: it is neither
        filtered nor counted in the density fence, whose quartiles its outsized density would
        otherwise lift over a focal group. Probed: the communities (>= 2 collections) denser than
        the third quartile of those not set aside, again after each one is set aside."""
        if self.max_dependent_share is None:
            return [], {}
        groups = [i for i, c in enumerate(communities) if len(c) >= 2]
        aside: list[int] = []
        shares: dict[int, float] = {}
        while True:
            counted = [j for j in groups if j not in aside]
            if not counted:
                break
            _, q3 = _quartiles([densities[j] for j in counted])
            probe = [j for j in counted if densities[j] > q3 and j not in shares]
            for j in probe:
                inside = torch.isin(owner, torch.tensor(communities[j]))
                dependent = self._exclude(ranked, owner, k, m, valid, [communities[j]])
                shares[j] = float(dependent[inside].float().mean())
            found = [j for j in probe if shares[j] > self.max_dependent_share]
            if not found:
                break
            aside = sorted(aside + found)
        return aside, shares

    def _final_scores(
        self,
        fresh: Callable[[], Iterable[Tensor]],
        valid: Tensor,
        excluded: Tensor,
        partners: Tensor,
        k: int,
        options: EngineOptions,
        grid: Sequence[int] | None = None,
        keep: int = 0,
        kept: list[Tensor] | None = None,
    ) -> Tensor:
        """(T,) mean over views of mutual scores on the refined base (exact second pass); with
        `keep`, `kept` is refilled with each view's `keep` smallest distances of this pass."""
        base = valid & ~excluded
        total, count = None, 0
        if keep:
            kept.clear()
        for view in fresh():
            ranked = ranked_minima(view, valid, max(k, keep), base=base, partners=partners, options=options, grid=grid)
            scores = _mean_smallest(ranked.distances[:, :k], k, self.squared)
            if keep:
                kept.append(ranked.distances[:, :keep].clone())
            total = scores if total is None else total.add_(scores)
            count += 1
        return total / count


def community_density(graph: igraph.Graph, members: Sequence[int], density: str = "strength") -> float:
    """Internal connection strength of a community: "strength" = mean internal weighted degree
    2 W_in / n, "pair" = internal weight per node pair W_in / (n (n - 1) / 2); 0 for a single
    collection (W_in: summed weight of the edges inside `members`)."""
    n = len(members)
    if n < 2:
        return 0.0
    internal = sum(graph.subgraph(members).es["weight"])
    return 2.0 * internal / n if density == "strength" else internal / (n * (n - 1) / 2)


def tukey_fence(densities: Sequence[float], k: float, min_spread: float = 0.0) -> float:
    """Q3 + k max(IQR, min_spread) of `densities` (linear-interpolated quartiles)."""
    q1, q3 = _quartiles(densities)
    return q3 + k * max(q3 - q1, min_spread)


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    q = torch.tensor(list(values), dtype=torch.float64).quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _view_source(features: Views) -> Callable[[], Iterable[Tensor]]:
    """A zero-argument callable giving a fresh iterable of views."""
    if isinstance(features, Tensor):
        return lambda: [features]
    if callable(features):
        return features
    if isinstance(features, Sequence):
        return lambda: features
    raise VolscanError(
        f"features: expected a tensor (N, M, C), a sequence of them or a callable returning views, "
        f"got {type(features).__name__}"
    )


def _check_view(view: object, index: int, shape: tuple[int, int] | None) -> Tensor:
    if not isinstance(view, Tensor):
        raise VolscanError(f"features view {index}: expected a tensor (N, M, C), got {type(view).__name__}")
    (view,) = as_layers(view, name=f"features view {index}")
    if shape is not None and tuple(view.shape[:2]) != shape:
        raise VolscanError(f"features view {index}: shape {tuple(view.shape)} does not match (N, M) = {shape}")
    return view


def _require_three(n: int) -> None:
    if n < 3:
        raise VolscanError(f"CoDeGraph needs at least 3 collections (a reference rank beyond the links), got {n}")


def _to_grid(values: Tensor, valid: Tensor) -> Tensor:
    out = torch.full(valid.shape, torch.nan)
    out[valid] = values
    return out


def _mean_smallest(sorted_values: Tensor, k: int, squared: bool) -> Tensor:
    """(T,) mean of the first k of ascending rows (squared distances if `squared`); +inf entries
    (fewer than k partners with a base element) count as the row's largest finite entry."""
    head = sorted_values[:, :k]
    if squared:
        head = head.square()
    if bool(torch.isinf(head).any()):
        worst = head.masked_fill(torch.isinf(head), -torch.inf).amax(1, keepdim=True)
        head = torch.where(torch.isinf(head), worst, head)
    return head.double().mean(1).float()


def _first_ranks(ranked: Ranked, rank: int) -> Ranked:
    """`ranked` cut to its first `rank` entries (views, no copy)."""
    if ranked.distances.shape[1] == rank:
        return ranked
    nearest = None if ranked.nearest is None else ranked.nearest[:, :rank]
    return Ranked(distances=ranked.distances[:, :rank], collections=ranked.collections[:, :rank], nearest=nearest)


def _ranked_from_full(distances: Tensor, rank: int) -> Ranked:
    """`Ranked` (no positions) from full (T, N) distances."""
    values, order = distances.topk(rank, dim=1, largest=False, sorted=True)
    return Ranked(distances=values, collections=order.to(index_dtype(distances.shape[1])), nearest=None)


def _base_scores(ranked: list[Ranked], k: int, removed: Tensor | None, base: Tensor) -> Tensor:
    """(T,) mean over views of the mean of the k smallest stored entries that survive: collection
    not `removed` ((N,) bool or None) and nearest element in `base` ((N, M) bool; ignored for lists
    without positions). Missing entries count as the last stored distance (a lower bound)."""
    m = base.shape[1]
    flat_base = base.flatten()
    total = torch.zeros(ranked[0].distances.shape[0])
    for r in ranked:
        for start in range(0, len(total), ROW_CHUNK):
            d = r.distances[start : start + ROW_CHUNK]
            cols = r.collections[start : start + ROW_CHUNK].long().clamp_min(0)
            keep = torch.isfinite(d)
            if removed is not None:
                keep &= ~removed[cols]
            if r.nearest is not None:
                keep &= flat_base[cols * m + r.nearest[start : start + ROW_CHUNK].long().clamp_min(0)]
            take = keep & (keep.cumsum(1) <= k)
            got = take.sum(1)
            last = d[:, -1].masked_fill(torch.isinf(d[:, -1]), 0.0)
            sums = d.double().where(take, 0.0).sum(1) + (k - got) * last.double()
            total[start : start + ROW_CHUNK] += (sums / k).float()
    return total / len(ranked)
