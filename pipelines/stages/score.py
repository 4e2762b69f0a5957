"""Stage 4 of `volscan screen`: token sets to element and collection scores
(`volumetric.engine.score_collections` on the whole batch, 2D and 3D alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.json_ready import plain

if TYPE_CHECKING:
    from volumetric.engine import ScoringConfig


@dataclass
class Scores:
    """`element_scores` (N, *grid) float32 (NaN = void), `collection_scores` (N,) float64,
    `settings`: the scoring configuration as used (JSON-ready); `graph`, `communities`
    (lists of subject indices), `outlier_communities` (community indices), `excluded_fraction`,
    `summary`: CoDeGraph's results (None / empty for MuSc)."""

    element_scores: np.ndarray
    collection_scores: np.ndarray
    settings: dict[str, Any]
    graph: Any = None
    communities: list[list[int]] | None = None
    outlier_communities: list[int] | None = None
    excluded_fraction: float = 0.0
    summary: dict[str, Any] | None = None
    excluded: np.ndarray | None = None  # (N, *grid) bool: CoDeGraph's exclusions (kept for `--reference`)
    # (V, T, K) float32: per view, each valid element's K smallest minima (kept for `--reference`); None when
    # the settings cannot serve as a reference (`volumetric.engine.reference.reference_refusal`)
    kept_minima: np.ndarray | None = None
    # (N,) float64: a `--reference` run's reference scans' scores updated with the new scans as partners
    reference_scores: np.ndarray | None = None


def score_tokens(token_sets: list[Any], method: str, scoring_config: "ScoringConfig") -> Scores:
    """Mutual scoring (+ CoDeGraph) of every token set against the others; each element's
    smallest minima are kept for later `--reference` screens when the settings allow one."""
    import torch

    from volumetric.classical_tokens import needs_batch_standardize, standardize_batch
    from volumetric.engine import score_collections
    from volumetric.engine.reference import kept_count, method_top_fraction, reference_refusal

    layers = [torch.stack([t.layers[i] for t in token_sets]) for i in range(len(token_sets[0].layers))]
    valid = ~torch.stack([t.void for t in token_sets])
    if needs_batch_standardize(token_sets):  # classical tokens: per-channel z over the batch's valid tokens
        layers = standardize_batch(layers, valid)
    keep = 0 if reference_refusal(scoring_config) else kept_count(len(token_sets), method_top_fraction(scoring_config,
                                                                                                     method))
    result = score_collections(layers, valid, method=method, config=scoring_config, keep_minima=keep)
    scores = Scores(
        element_scores=np.asarray(torch.as_tensor(result.element_scores).float().cpu(), dtype=np.float32),
        collection_scores=np.asarray(torch.as_tensor(result.collection_scores).double().cpu()),
        settings=plain(scoring_config),
        kept_minima=torch.stack(result.kept_minima).numpy() if result.kept_minima else None,
    )
    graph = result.codegraph
    if graph is not None:
        scores.graph = graph.graph
        scores.communities = [list(map(int, c)) for c in graph.communities]
        scores.outlier_communities = [int(c) for c in graph.outlier_communities]
        scores.excluded_fraction = float(graph.excluded_fraction)
        scores.excluded = graph.excluded.reshape(scores.element_scores.shape).numpy()
        scores.summary = graph.summary()
    return scores
