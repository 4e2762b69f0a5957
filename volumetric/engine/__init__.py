"""The shared scoring engine: mutual scoring, LNAMD and CoDeGraph, one code path for 2D and 3D.

Contracts: docs/architecture.md; choices and measurements: docs/engine.md.
"""

from volumetric.engine.codegraph import CoDeGraph, CoDeGraphResult
from volumetric.engine.lnamd import lnamd
from volumetric.engine.mutual import MutualDistances, mutual_scores
from volumetric.engine.options import EngineOptions
from volumetric.engine.rscin import rscin
from volumetric.engine.scoring import ScoringConfig, ScoringResult, score_collections

__all__ = [
    "CoDeGraph",
    "CoDeGraphResult",
    "EngineOptions",
    "MutualDistances",
    "ScoringConfig",
    "ScoringResult",
    "lnamd",
    "mutual_scores",
    "rscin",
    "score_collections",
]
