"""Synthetic batches with known anomalies, for tests, demos and benchmarks of the engine.

Normal elements come from a few clusters shared by every collection; *random* anomalies are
unique points; a *consistent* anomaly is one pattern planted in a minority of collections (so
those elements find look-alikes in each other and fool plain mutual scoring). *Odd* collections
(`with_odd_collections`) are healthy ones with a whole-collection artefact, as a motion-corrupted
or mis-registered scan in a real cohort: anomalous everywhere, alike to nothing. A *subgroup*
(`with_subgroup`) is a set of healthy collections sharing one whole-collection offset, as an
older cohort's atrophic scans or one scanner's: every element differs alike, and the members vouch
for each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from volumetric.errors import VolscanError

NORMAL, RANDOM_ANOMALY, CONSISTENT_ANOMALY = 0, 1, 2
ARTEFACTS = ("global", "shifted", "noise", "scaled", "half")


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


def with_odd_collections(batch: SyntheticBatch, artefacts: str, seed: int) -> tuple[Tensor, list[int]]:
    """`batch.features` with whole-collection artefacts on healthy collections (no planted or random
    anomaly), one per name in `artefacts` joined by "+" (each on another collection, chosen by `seed`):
    "global" x * 1.35 + 0.5 noise per channel; "shifted" x + one random offset (spread 0.8) for all
    elements; "noise" x + 0.6 noise; "scaled" x * 1.6; "half" the global artefact on half the
    elements. Returns new (N, M, C) features and the odd collections' indices."""
    names = artefacts.split("+")
    if any(name not in ARTEFACTS for name in names):
        raise VolscanError(f"artefacts: expected names from {ARTEFACTS} joined by '+', got {artefacts!r}")
    features = batch.features.clone()
    g = torch.Generator().manual_seed(1000 + seed)
    healthy = [i for i in range(features.shape[0]) if not bool((batch.kind[i] != NORMAL).any())]
    if len(names) > len(healthy):
        raise VolscanError(f"artefacts: {len(names)} odd collections asked, {len(healthy)} healthy ones in the batch")
    order = torch.randperm(len(healthy), generator=g).tolist()
    odd = []
    for j, name in enumerate(names):
        i = healthy[order[j]]
        x = features[i]
        if name == "global":
            features[i] = x * 1.35 + 0.5 * torch.randn(x.shape, generator=g)
        elif name == "shifted":
            features[i] = x + 0.8 * torch.randn(x.shape[-1], generator=g)
        elif name == "noise":
            features[i] = x + 0.6 * torch.randn(x.shape, generator=g)
        elif name == "scaled":
            features[i] = x * 1.6
        else:
            half = x.shape[0] // 2
            features[i, :half] = x[:half] * 1.35 + 0.5 * torch.randn(x[:half].shape, generator=g)
        odd.append(i)
    return features, odd


def with_subgroup(batch: SyntheticBatch, size: int, seed: int, spread: float = 0.6) -> tuple[Tensor, list[int]]:
    """`batch.features` with `size` healthy collections (no planted or random anomaly; chosen by
    `seed`) shifted by one shared random offset (spread `spread`) on every element. Returns new
    (N, M, C) features and the subgroup's sorted indices."""
    healthy = [i for i in range(batch.features.shape[0]) if not bool((batch.kind[i] != NORMAL).any())]
    if size > len(healthy):
        raise VolscanError(f"subgroup: {size} collections asked, {len(healthy)} healthy ones in the batch")
    g = torch.Generator().manual_seed(2000 + seed)
    members = sorted(healthy[j] for j in torch.randperm(len(healthy), generator=g)[:size].tolist())
    features = batch.features.clone()
    features[members] += spread * torch.randn(features.shape[-1], generator=g)
    return features, members
