"""`score_collections`: the one entry point for 2D images and 3D volumes.

Per backbone layer and per LNAMD radius r (a *view*), tokens are aggregated (`lnamd`), scored
mutually, and the view scores are averaged (MuSc). With `method="codegraph"` the collection graph
is built from the views of the LNAMD radii in `graph_radii` (default r = 3 only: one view per
layer, so a link raises one connection per layer as in the paper; on the phantom ablations r = 1
and all views also form a pure lesion community, but r = 1 scored lower at 112^3 and all views
excluded 27 % of elements with a healthy community there: docs/engine.md), and the exclusion
mask it yields applies to the final mutual scoring of every view. Grids are flattened to M
elements, so nothing here depends on the grid being 2D or 3D; the grid's shape travels along for
position-aware scoring (`EngineOptions.window`), which compares cells, not element indices.

Memory: CoDeGraph keeps, per graph view, each valid element's r_ref nearest collections with
positions (T x r_ref x 8 bytes; T = valid tokens), other views only k; views are rebuilt
(cheap) for the final pass instead of being stored. `engine.memory_mb` bounds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import igraph
import torch
from torch import Tensor

from volumetric.engine.codegraph import CoDeGraph, CoDeGraphResult
from volumetric.engine.lnamd import BORDERS, lnamd
from volumetric.engine.mutual import mutual_scores
from volumetric.engine.options import EngineOptions
from volumetric.engine.partners import global_features as mean_token_features
from volumetric.engine.partners import subset_partition
from volumetric.engine.rscin import check_windows, rscin
from volumetric.engine.validation import as_layers, as_valid, check_fraction
from volumetric.errors import VolscanError

METHODS = ("codegraph", "musc")
DEFAULT_GRAPH_RADIUS = 3


@dataclass(frozen=True)
class ScoringConfig:
    """Settings of `score_collections`.

    `lnamd_radii`: odd r values, one view per (layer, r) (MuSc: 1, 3, 5). `graph_radii`: the
    radii whose views build CoDeGraph's graph (a subset of `lnamd_radii`); None (default) = r = 3
    when it is among `lnamd_radii`, else all views.
    `layer_norm`: LNAMD's per-map LayerNorm (MuSc; False is an ablation switch).
    `lnamd_border`: "zero" (MuSc's zero padding at the grid's edge) or "shift" (windows moved
    inside the grid; `volumetric.engine.lnamd`; the screen's default for 2D images).
    `musc_top_fraction`: f for `method="musc"` (MuSc: 0.3); CoDeGraph's f is
    `codegraph.top_fraction` (0.1). `rscin`: k-windows of MuSc's RsCIN re-scoring of the
    collection scores over the collections' global descriptors (`volumetric.engine.rscin`; MuSc
    uses (1, 2, 3) on MVTec AD, (1, 8, 9) on VisA), None = off (default, docs/engine.md).
    `engine`: how to compute (device, precision, blocks, memory budget, progress, subsets,
    pre-selection; `volumetric.engine.options`).
    """

    lnamd_radii: tuple[int, ...] = (1, 3, 5)
    graph_radii: tuple[int, ...] | None = None
    layer_norm: bool = True
    lnamd_border: str = "zero"
    musc_top_fraction: float = 0.3
    rscin: tuple[int, ...] | None = None
    codegraph: CoDeGraph = field(default_factory=CoDeGraph)
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        radii = tuple(self.lnamd_radii)
        if not radii or any(not isinstance(r, int) or r < 1 or r % 2 == 0 for r in radii):
            raise VolscanError(f"lnamd_radii: expected odd positive integers, got {self.lnamd_radii!r}")
        object.__setattr__(self, "lnamd_radii", radii)
        if self.graph_radii is not None:
            graph = tuple(self.graph_radii)
            if not graph or any(r not in radii for r in graph):
                raise VolscanError(f"graph_radii: expected a non-empty subset of lnamd_radii {radii}, got {self.graph_radii!r}")
            object.__setattr__(self, "graph_radii", graph)
        if self.lnamd_border not in BORDERS:
            raise VolscanError(f"lnamd_border: expected one of {', '.join(BORDERS)}, got {self.lnamd_border!r}")
        check_fraction("musc_top_fraction", self.musc_top_fraction)
        if self.rscin is not None:
            object.__setattr__(self, "rscin", check_windows(self.rscin, "rscin"))
        if not isinstance(self.codegraph, CoDeGraph):
            raise VolscanError(f"codegraph: expected a CoDeGraph, got {type(self.codegraph).__name__}")
        if not isinstance(self.engine, EngineOptions):
            raise VolscanError(f"engine: expected EngineOptions, got {type(self.engine).__name__}")

    def graph_views(self, layers: int) -> list[int] | None:
        """Indices (layer-major, as `score_collections` orders views) of the graph views (None = all)."""
        radii = self.graph_radii
        if radii is None:
            radii = (DEFAULT_GRAPH_RADIUS,) if DEFAULT_GRAPH_RADIUS in self.lnamd_radii else self.lnamd_radii
        return [i * len(self.lnamd_radii) + j for i in range(layers) for j, r in enumerate(self.lnamd_radii) if r in radii]


@dataclass(frozen=True)
class ScoringResult:
    """`element_scores` (N, *grid) float32, NaN at void; `collection_scores` (N,) float32 = max
    over valid elements (re-scored by RsCIN when `ScoringConfig.rscin` is set); `codegraph` the
    CoDeGraph outcome (None for MuSc); `method`; `kept_minima`: per view (T, K) float32, each
    valid element's K smallest `d(x, J)` of the final scoring pass (`keep_minima`; empty when not
    asked)."""

    element_scores: Tensor
    collection_scores: Tensor
    codegraph: CoDeGraphResult | None
    method: str
    kept_minima: tuple[Tensor, ...] = ()

    def summary(self) -> dict:
        """JSON-ready facts for a report (CoDeGraph details included when present)."""
        facts = {"method": self.method, "collection_scores": self.collection_scores.tolist()}
        if self.codegraph is not None:
            facts["codegraph"] = self.codegraph.summary()
        return facts


def score_collections(
    layers: Sequence[Tensor] | Tensor,
    valid: Tensor | None = None,
    method: str = "codegraph",
    config: ScoringConfig | None = None,
    *,
    global_features: Tensor | None = None,
    keep_minima: int = 0,
) -> ScoringResult:
    """Score a batch of N collections given per-layer token grids.

    `layers`: list of (N, h, w, C_l) or (N, g, g, g, C_l) tensors (one per backbone layer, same
    N and grid). `valid`: (N, *grid) bool or None. `method`: "codegraph" or "musc".
    `global_features`: optional (N, D) (e.g. [CLS]) for pre-selection and RsCIN (which
    L2-normalises them: cosine similarities); default the per-layer L2-normalised mean of the
    valid tokens (`partners.global_features`). `keep_minima` K > 0: also return each valid
    element's K smallest minima per view (`ScoringResult.kept_minima`; one batch only, no
    `subsets`), what a later reference screen updates the scores from; the scores are unchanged.
    """
    config = ScoringConfig() if config is None else config
    if method not in METHODS:
        raise VolscanError(f"method: expected one of {METHODS}, got {method!r}")
    grids = [layers] if isinstance(layers, Tensor) else list(layers)
    if not grids or any(not isinstance(g, Tensor) or g.ndim not in (4, 5) for g in grids):
        shapes = [tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__ for g in grids]
        raise VolscanError(f"layers: expected (N, h, w, C) or (N, g, g, g, C) tensors, got {shapes}")
    n, *grid = grids[0].shape[:-1]
    for i, g in enumerate(grids):
        if list(g.shape[:-1]) != [n, *grid]:
            raise VolscanError(f"layers[{i}]: shape {tuple(g.shape)} does not match (N, *grid) = {(n, *grid)}")
    m = math.prod(grid)
    flat = as_layers([g.reshape(n, m, g.shape[-1]) for g in grids], name="layers")
    if valid is not None and (not isinstance(valid, Tensor) or tuple(valid.shape) != (n, *grid)):
        got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise VolscanError(f"valid: expected shape {(n, *grid)}, got {got}")
    valid_flat = as_valid(None if valid is None else valid.reshape(n, m), n, m)
    engine = config.engine
    if (engine.preselect_fraction is not None or config.rscin is not None) and global_features is None:
        global_features = mean_token_features(flat, valid_flat)

    scores = torch.full((n, m), torch.nan)
    parts = subset_partition(n, engine.subsets, engine.seed)
    if keep_minima and len(parts) > 1:
        raise VolscanError("keep_minima: the minima of one batch are kept; leave subsets at 1")
    per_subset = replace(engine, subsets=1)
    results = []
    kept: list[Tensor] = []
    for part in parts:
        sub_valid = valid_flat[part]
        sub_grids = [g[part.to(g.device)] for g in grids]
        sub_globals = None if global_features is None else global_features[part]

        def views(sub_grids=sub_grids, sub_valid=sub_valid, size=len(part)) -> Iterator[Tensor]:
            return lnamd_views(sub_grids, sub_valid.reshape(size, *grid), config.lnamd_radii, config.layer_norm,
                               border=config.lnamd_border)

        if method == "musc":
            view_scores = [
                mutual_scores(
                    v, config.musc_top_fraction, sub_valid, global_features=sub_globals, options=per_subset, grid=grid,
                    keep=keep_minima,
                )
                for v in views()
            ]
            if keep_minima:
                kept = [v.smallest for v in view_scores]
                view_scores = [v.scores for v in view_scores]
            scores[part] = torch.stack(view_scores).mean(0)
        else:
            result = config.codegraph(
                views, sub_valid, graph_views=config.graph_views(len(grids)), global_features=sub_globals,
                options=per_subset, grid=grid, keep=keep_minima,
            )
            kept = list(result.kept_minima)
            scores[part] = result.scores
            results.append(result)
    codegraph = None
    if results:
        codegraph = results[0] if len(parts) == 1 else _merge(results, parts, valid_flat)
    collection_scores = scores.nan_to_num(-torch.inf).amax(1)
    if config.rscin is not None:  # over the whole batch, also when it was scored in subsets
        descriptors = torch.nn.functional.normalize(global_features.float().cpu(), dim=1)
        collection_scores = rscin(collection_scores, descriptors, config.rscin)
    return ScoringResult(
        element_scores=scores.reshape(n, *grid),
        collection_scores=collection_scores,
        codegraph=codegraph,
        method=method,
        kept_minima=tuple(kept),
    )


def lnamd_views(grids: list[Tensor], valid: Tensor, radii: tuple[int, ...], layer_norm: bool, *,
                border: str = "zero") -> Iterator[Tensor]:
    """Lazily yield one (n, M, C) LNAMD view per (layer, r), so only one lives at a time."""
    for g in grids:
        for r in radii:
            view = lnamd(g, r, valid.to(g.device), layer_norm=layer_norm, border=border)
            yield view.reshape(g.shape[0], -1, g.shape[-1])


def _merge(results: list[CoDeGraphResult], parts: list[Tensor], valid: Tensor) -> CoDeGraphResult:
    """One CoDeGraphResult in batch indices from per-subset results."""
    n, m = valid.shape
    grids = {name: torch.full((n, m), torch.nan) for name in ("scores", "mutual_scores")}
    excluded = torch.zeros(n, m, dtype=torch.bool)
    communities, outliers, densities, fences, edges, weights = [], [], [], [], [], []
    diffuse, shares = [], {}
    for result, part in zip(results, parts):
        for name, grid in grids.items():
            grid[part] = getattr(result, name)
        excluded[part] = result.excluded
        ids = part.tolist()
        outliers += [len(communities) + c for c in result.outlier_communities]
        diffuse += [len(communities) + c for c in result.diffuse_communities]
        shares |= {len(communities) + c: share for c, share in result.dependent_shares.items()}
        communities += [sorted(ids[i] for i in c) for c in result.communities]
        densities += result.densities
        fences += result.density_fences
        for source, target, weight in result.edges:
            edges.append((ids[source], ids[target]))
            weights.append(weight)
    graph = igraph.Graph(n=n, edges=edges)
    graph.es["weight"] = weights
    return CoDeGraphResult(
        scores=grids["scores"],
        mutual_scores=grids["mutual_scores"],
        excluded=excluded,
        graph=graph,
        communities=communities,
        outlier_communities=outliers,
        densities=densities,
        density_fences=fences,
        reference_rank=min(r.reference_rank for r in results),
        suspicious_links=sum(r.suspicious_links for r in results),
        graph_views=results[0].graph_views,
        valid=valid,
        diffuse_communities=diffuse,
        dependent_shares=shares,
    )
