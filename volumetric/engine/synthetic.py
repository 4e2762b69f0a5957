"""Synthetic batches with known anomalies, for tests, demos and benchmarks of the engine.

Normal elements come from a few clusters shared by every collection; *random* anomalies are
unique points; a *consistent* anomaly is one pattern planted in a minority of collections (so
those elements find look-alikes in each other and fool plain mutual scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from volumetric.errors import VolscanError

NORMAL, RANDOM_ANOMALY, CONSISTENT_ANOMALY = 0, 1, 2


@dataclass(frozen=True)
class SyntheticBatch:
    """`features` (N, M, C) float32; `kind` (N, M) int64 (0 normal, 1 random anomaly,
    2 consistent anomaly); `consistent` sorted collection indices holding the consistent one."""

    features: Tensor
    kind: Tensor
    consistent: list[int]


def synthetic_batch(
    n: int = 30,
    m: int = 64,
    c: int = 16,
    *,
    clusters: int = 8,
    consistent: int = 5,
    random_collections: int = 5,
    per_collection: int = 6,
    noise: float = 0.25,
    pattern_noise: float = 0.15,
    seed: int = 0,
) -> SyntheticBatch:
    """A batch of `n` collections of `m` elements in `c` dimensions (unit-variance cluster centres).

    `consistent` collections get `per_collection` elements of one shared pattern (spread
    `pattern_noise`); `random_collections` other collections get as many unique random points.
    """
    if consistent + random_collections > n or per_collection > m:
        raise VolscanError("synthetic_batch: more anomalous collections or elements than the batch holds")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, c, generator=g)
    features = centres[torch.randint(clusters, (n, m), generator=g)] + noise * torch.randn(n, m, c, generator=g)
    kind = torch.zeros(n, m, dtype=torch.int64)
    pattern = torch.randn(c, generator=g)
    order = torch.randperm(n, generator=g).tolist()
    for index, i in enumerate(order[: consistent + random_collections]):
        positions = torch.randperm(m, generator=g)[:per_collection]
        if index < consistent:
            features[i, positions] = pattern + pattern_noise * torch.randn(per_collection, c, generator=g)
            kind[i, positions] = CONSISTENT_ANOMALY
        else:
            features[i, positions] = torch.randn(per_collection, c, generator=g)
            kind[i, positions] = RANDOM_ANOMALY
    return SyntheticBatch(features=features, kind=kind, consistent=sorted(order[:consistent]))
