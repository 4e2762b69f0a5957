"""`EngineOptions`: how the engine computes (not what it computes), passed down whole.

One frozen object travels from `score_collections` / `CoDeGraph` / `mutual_scores` to
`collection_minima`, instead of `device`, `precision`, `block_mb`, `progress` and the pair plan
being re-listed at every layer. Results depend on `subsets`, `preselect_fraction`, `seed` and `window`
(which pairs are compared) and, slightly, on `precision`; the rest only changes speed/memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from volumetric.engine.validation import check_fraction
from volumetric.errors import VolscanError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings shared by every entry point.

    `device`: "cpu", "cuda", "cuda:N" or None / "auto" (GPU when there is one); checked when used.
    `precision`: "fp32" (default, results equal to a float64 reference to 1e-5), "bf16" (matrix
    products in bfloat16 with float32 norms and accumulation: fast on CPUs with AVX512-BF16/AMX
    and on CUDA) or "fp16" (CUDA only). `block_mb`: MiB of one float32 block of distances
    (bigger on GPUs). `memory_mb`: budget for what a batch keeps (CoDeGraph), None = no limit.
    `exact_top`: with precision "bf16" / "fp16", the share of elements with the highest scores
    (the batch's 2 x that share, and that share but at least 8 of each collection) whose
    distances each `mutual_scores` call recomputes in fp32, so that its collection scores (the
    maximum) and the peaks of its map are exact (0 = off). 2D-like benchmark (docs/engine.md):
    the refinement costs ~7 % of an fp32 run; full bf16 runs with 0.01 are 11.7x MuSc's fp32
    formulation at top-1 % agreement 1.000 (0.963 with 0). `progress`: tqdm bars.
    Pair plan (`volumetric.engine.partners`): `subsets` (split the batch
    into s independent subsets), `preselect_fraction` (compare each collection with that share
    of its most similar collections, None = all) and `seed` (subset split).
    `window`: position-aware scoring for inputs on one shared grid (registered volumes, aligned
    images): each element is compared only with the elements of the other collections whose
    grid cell lies within `window` cells of its own (Chebyshev distance; 0 = the same cell);
    None (default) = every element of every other collection (`volumetric.engine.window`).
    Results depend on it; the callers pass the grid shape.
    """

    device: str | None = None
    precision: str = "fp32"
    block_mb: float = 32.0
    memory_mb: float | None = None
    exact_top: float = 0.01
    progress: bool = True
    subsets: int = 1
    preselect_fraction: float | None = None
    seed: int = 0
    window: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise VolscanError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if not (isinstance(self.block_mb, (int, float)) and self.block_mb > 0):
            raise VolscanError(f"block_mb: must be a number > 0, got {self.block_mb!r}")
        if self.memory_mb is not None and not (isinstance(self.memory_mb, (int, float)) and self.memory_mb > 0):
            raise VolscanError(f"memory_mb: must be a number > 0 or None, got {self.memory_mb!r}")
        if isinstance(self.exact_top, bool) or not (
            isinstance(self.exact_top, (int, float)) and 0.0 <= self.exact_top <= 1.0
        ):
            raise VolscanError(f"exact_top: must be a number in [0, 1], got {self.exact_top!r}")
        if isinstance(self.subsets, bool) or not isinstance(self.subsets, int) or self.subsets < 1:
            raise VolscanError(f"subsets: must be a positive integer, got {self.subsets!r}")
        if self.preselect_fraction is not None:
            check_fraction("preselect_fraction", self.preselect_fraction)
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 0):
            raise VolscanError(f"window: must be an integer >= 0 (cells) or None, got {self.window!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise VolscanError(f"device: expected a string such as 'cpu' or 'cuda', got {self.device!r}")
