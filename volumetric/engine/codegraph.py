"""CoDeGraph: stop consistent anomalies from vouching for each other (dissertation ch. 3).

A *consistent* anomaly (one anomalous pattern in a few collections) finds close look-alikes in
those few collections, so top-k mutual scoring calls it normal. Its sorted mutual similarity
vector "burns out": small for the first ranks, then a jump once the look-alikes are used up.
CoDeGraph turns the most burnt-out links into a graph of collections, finds unusually dense
communities (Leiden/CPM), removes their dependent elements from the base of neighbours, and
scores again. Stages and defaults, each with its evidence:

1. **Reference rank** `r_ref = round(0.3 N)` (`reference_fraction = 0.3`): the text allows 30-70 %
   of N; the paper's reference-rank ablation row 0.3 N reproduces its main MVTec-CA table
   exactly, so 0.3 N is what the paper ran. (0.5 was our earlier default; an ablation option.)
2. **Weighted endurance ratio** `w(x, i) = d_(i)^(1-eps) / d_(r_ref)` for ranks `i < r_ref` (eq. 3.4:
   the ratio times `d_(i)^-eps`); `eps = 0.1` (the value is lost in our copy: small, as the text
   says, it only breaks near-ties towards links with a larger absolute distance).
3. **Multi-layer graph** (§3.2): per graph view (layer) the mutual similarity vector is sorted,
   the sorted vectors are averaged across views, and the ratio is read from the average; a link
   selected at rank i raises one connection to the i-th nearest collection *of each view*, so the
   total edge weight is links x views ("four layers -> four connections"). `graph="averaged"`
   switches back to our earlier departure (distances averaged per collection over views, then
   sorted, one connection per link; needs (T, N) memory).
4. **Coverage-based link selection** (Algorithm 1): links are added cheapest first, `link_batch`
   = 64 at a time, until `coverage` = every collection touches one (both values lost; full
   coverage is the reading without a free number and lets every collection be judged: on the
   224^3 look-alike cohorts it flags more lesion scans and fewer healthy ones than our earlier
   0.95, at the price of a community flagged in 5.6 % instead of 2.5 % of pure-noise synthetic
   batches, docs/engine.md "Session 5"; 64 only moves the stop by less than a batch). Computed
   in closed form: each collection's *need* is the number of links up to its first (cheapest)
   one; the stop is the ceil(coverage N)-th smallest need, rounded up to a whole batch.
   One departure, because a measured case needs it (`stop_fence` = 1.5): needs above
   Q3 + 1.5 IQR of all N needs do not count. A collection with a whole-scan artefact (motion,
   wrong contrast, a mis-registration) finds no close look-alike, its first link comes hundreds
   of links after everyone else's, and the literal stop at the largest need let that one
   collection set the link budget: on `synthetic_batch(n=30, m=64, consistent=5)` with one
   healthy collection given `x * 1.35 + 0.5 noise` the planted group was found with no normal
   collection flagged in 1 of 10 development seeds (0-9; 8 of 10 without the odd scan), with
   the fence in 10 of 10 (and 10 of 10 without it). k = 3 kept a second, different odd scan
   (7 of 10); chosen on seeds 0-9 over needs fences k = 1.5 / 3, a log-scale fence, a gap rule
   and coverage quantiles (docs/engine.md "Link-selection stop"); `stop_fence=None` is the literal rule.
   Held out (seeds 10-39): 24-28 of 30 with odd scans (literal 7-27), 28 without; on seeds
   10-19 alone 6-7 of 10 for four artefact forms, so it helps a lot but is not yet a guarantee.
5. **Communities**: Leiden, CPM, weighted, resolution = 25th percentile of edge weights (paper).
   Density = a community's *internal connection strength* (the paper's words; eq. 3.6 is lost):
   `density="strength"`, the mean internal weighted degree `2 W_in / n` (connections a member
   keeps inside its community). `density="pair"` (our earlier reading, an option) = internal
   weight per node pair `W_in / (n (n - 1) / 2)`. Single collections have no internal edges and
   are never outliers (one scan cannot be a *consistent* anomaly).
   Measured (all communities of 18 look-alike phantom cohorts, contrast 1.25-2.0, seeds 0-2,
   N 60/90, plus the 5 distinct lesion-free cohorts among their healthy scans; docs/engine.md,
   "Outlier rule"): Leiden forms a pure lesion community (9-25 scans) in all 18. Per pair, 2-4
   scan communities of healthy scans reach densities up to 14.3, as dense as the lesion community
   (4.9-20.7; a pair's density is the heaviest edge Leiden kept), so the fence over per-pair
   densities missed the lesion community in 8 of 18 cohorts. Per member, the lesion community
   (42-311 connections) stands 3.7-42 IQRs above Q3 of the others in all 18, and the "strength"
   fence with k = 3 flags it in 18 of 18 (per pair, k = 1.5: 10 of 18). The cost, measured: in 3
   of the 5 lesion-free cohorts a 6-9-scan community of mutually similar healthy scans is flagged
   too (per pair, k = 1.5: 1 of 5), and targeted filtering then excludes 11-16 % of its elements.
   Those scans are the ones with the strongest phantom bias fields (a continuous nuisance, not a
   discrete normal variant: their cubes in the field's extremes find look-alikes only in each
   other); the same cohorts rendered without the bias field flag nothing (session 3,
   docs/engine.md "Lesion-free false flags"). No size-aware rule we tried
   (fence over >= 3-scan communities only, internal fraction W_in / volume, total internal
   weight, modularity excess, log scales, k up to 6) flags the lesion community in all 18 and
   nothing on all 5; the best that flags nothing on the 5 (per member, fence over >= 3-scan
   communities, k = 6) flags it in 11 of 18. At subtler contrast (1.0-1.15: 3 later cohorts),
   where the look-alike signal is as weak as the structure among healthy scans, the strength
   fence flags healthy-majority communities and CoDeGraph scores below MuSc at the same f
   (patient AUROC 87.8 vs 91.5, 92.9 vs 93.8, 90.4 vs 92.3).
6. **Outliers: Tukey** (paper): density > Q3 + k IQR over the densities of all communities of
   >= 2 collections, `iqr_k = 3` ("a large k" by default, the paper's value is lost; the classic
   far-out fence). With the per-member density k = 3 and k = 1.5 both flag the lesion community in
   18 of 18; beside it k = 3 flags 5 healthy-majority communities (6-9 scans) in those cohorts,
   k = 1.5 13 (per pair, k = 1.5: 6, of 2-4 scans; docs/engine.md "Outlier rule").
   One departure, because a measured case needs it: the IQR is floored at `min_spread` = 1
   connection (per member or per pair; a 2-scan community's density is its edge weight, whole
   connections), the granularity of a small community's density. Without it a lesion-free batch
   where most communities have the same link count (IQR = 0) flags any community a little denser
   (`synthetic_batch(m=64, per_collection=10, consistent=0, seed=1)`: a 2-collection community of
   strength 3 among 2s, 4 normal elements excluded; test_engine_codegraph.py). On lesion-free
   synthetic batches (`m=96`, seeds 0-7, IQR floored) k = 1.5 flags noise in 2 of 8 (3 of 8 at
   coverage 0.95), k = 3 in none: the large k is the default. `min_spread=0` is the plain fence;
   `fence="robust"` switches back to our earlier departure (each community against the other communities'
   quartiles, IQR floored at sqrt(max(Q3, 1))).
7. **Targeted filtering** (Algorithm 2, eq. 3.8): outlier communities one after another (largest
   first) against the *current* base: earlier exclusions are already masked, so when one pattern
   is split into two communities, cleaning the first lets the second lose its vouchers too. For
   community C, each element's dependency ratio = (score without C's collections) / (score),
   both on the current base; elements of C whose ratio exceeds the `dependency_percentile` = 99th
   percentile (value lost; ~1 % false exclusions) of the same ratio outside C (among elements
   still in the base) leave the base.
   Computed on the stored top-r_ref lists of the graph views: entries whose collection is removed
   or whose nearest element is excluded are skipped; if fewer than k stay, the missing ones count
   as d_(r_ref) (a lower bound). `filtering="independent"` switches back to judging each
   community alone against the full base.
8. **Final score** (eq. 3.10): mutual scoring with `top_fraction` f = 0.1 (paper) on the refined
   base, per view, averaged. A second, exact pass over the distances with the exclusion mask
   (`volumetric.engine.ranked`). Plain Euclidean by default (`squared=False`): MuSc's code and
   the endurance ratio use it; eq. 3.9 writes the squared distance (`squared=True`), measured in
   `docs/engine.md`.

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

from volumetric.engine.distances import collection_minima
from volumetric.engine.mutual import top_k_counts
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import global_features as mean_token_features
from volumetric.engine.partners import plan_pairs
from volumetric.engine.ranked import BYTES_PER_MB, Ranked, index_dtype, ranked_bytes, ranked_minima
from volumetric.engine.validation import as_layers, as_valid, check_fraction
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
    total edge weight).
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
    graph: str = "layerwise"
    fence: str = "tukey"
    filtering: str = "sequential"
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
    ) -> CoDeGraphResult:
        """Score a batch. `graph_views`: indices of the views whose neighbours build the graph
        (None = all). `global_features` (N, D): pre-selection feature (default: mean valid token
        of the first view). `options.subsets` must be 1 (`score_collections` splits batches)."""
        options = EngineOptions() if options is None else options
        if options.subsets != 1:
            raise VolscanError("subsets: CoDeGraph scores one batch; split batches with score_collections")
        fresh = _view_source(features)
        n = m = 0
        partners = k = r_ref = None
        graph_ranked: list[Ranked] = []
        full_minima: list[Tensor] = []
        musc, count = None, 0
        for index, view in enumerate(fresh()):
            view = _check_view(view, index, (n, m) if index else None)
            if index == 0:
                n, m = view.shape[:2]
                _require_three(n)
                valid = as_valid(valid, n, m)
                k = int(top_k_counts(torch.tensor([n]), self.top_fraction))
                r_ref = self.reference_rank(n)
                partners = self._partners(view, valid, global_features, options, r_ref)
                if graph_views is None and not callable(features):  # every view builds the graph
                    graph_views = range(1 if isinstance(features, Tensor) else len(features))
                self._check_memory(valid, graph_views, options, r_ref, k)
            in_graph = graph_views is None or index in graph_views
            if in_graph and self.graph == "averaged":
                minima = collection_minima([view], valid, partners=partners, options=options)
                full_minima.append(minima.distances)
                view_scores = _mean_smallest(minima.distances.sort(1).values[:, :k], k, False)
            else:
                rank = r_ref if in_graph else k
                ranked = ranked_minima(view, valid, rank, partners=partners, nearest=in_graph, options=options)
                view_scores = _mean_smallest(ranked.distances[:, :k], k, False)
                if in_graph:
                    graph_ranked.append(ranked)
            musc = view_scores if musc is None else musc.add_(view_scores)
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
        owner = torch.repeat_interleave(torch.arange(n), valid.sum(1))

        graph, links = self._graph(graph_ranked, owner, n, r_ref)
        communities, densities = self._communities(graph)
        outliers, fences = self._outliers(communities, densities)
        excluded_flat = self._exclude(graph_ranked, owner, k, m, valid, [communities[c] for c in outliers])
        connections = len(graph_ranked)
        del graph_ranked
        excluded = torch.zeros(n, m, dtype=torch.bool)
        excluded[valid] = excluded_flat
        if bool(excluded_flat.any()) or self.squared:
            final = self._final_scores(fresh, valid, excluded, partners, k, options)
        else:
            final = musc
        logger.info(
            "CoDeGraph: r_ref %d, %d links x %d views, %d communities, %d outlier(s), %.2f %% elements excluded",
            r_ref, links, connections, len(communities), len(outliers), 100.0 * float(excluded_flat.float().mean()),
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

    def _outliers(self, communities: list[list[int]], densities: list[float]) -> tuple[list[int], list[float]]:
        """Communities (>= 2 collections) above the density fence; returns indices and fences
        (inf for singletons)."""
        groups = [i for i, c in enumerate(communities) if len(c) >= 2]
        fences = [math.inf] * len(communities)
        for i in groups:
            if self.fence == "tukey":
                fences[i] = tukey_fence([densities[j] for j in groups], self.iqr_k, self.min_spread)
            else:
                others = [densities[j] for j in groups if j != i] or [0.0]
                q1, q3 = _quartiles(others)
                fences[i] = q3 + self.iqr_k * max(q3 - q1, math.sqrt(max(q3, 1.0)))
        return [i for i in groups if densities[i] > fences[i]], fences

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

    def _final_scores(
        self,
        fresh: Callable[[], Iterable[Tensor]],
        valid: Tensor,
        excluded: Tensor,
        partners: Tensor,
        k: int,
        options: EngineOptions,
    ) -> Tensor:
        """(T,) mean over views of mutual scores on the refined base (exact second pass)."""
        base = valid & ~excluded
        total, count = None, 0
        for view in fresh():
            ranked = ranked_minima(view, valid, k, base=base, partners=partners, options=options)
            scores = _mean_smallest(ranked.distances, k, self.squared)
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
