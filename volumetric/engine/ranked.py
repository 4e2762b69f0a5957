"""The r nearest collections of every element, kept in memory that grows with T * r, not T * N.

CoDeGraph needs, per view, only the first `r_ref` entries of each element's sorted mutual
similarity vector (distance, collection, and the position of the nearest element there), and the
final scores only the first `k`. `ranked_minima` streams the batch in pairs of collection blocks:
each block pair is one `collection_minima` call (every pair of collections still computed once,
through the blocked distance code), and its (rows, partners) minima are merged at once into a
running top-r list per element. What stays allocated is the (T, r) lists plus one block pair.

A *base* mask restricts the neighbours: `d(x, J) = min over base elements of J`, while every
valid element is still scored. Elements outside the base are scored through "shadow"
collections (the same features, only those elements valid) paired with every base collection,
so targeted filtering's final scores are exact, not patched from stored minima.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from volumetric.engine.options import EngineOptions
from volumetric.engine.window import scoped_minima

BYTES_PER_MB = 2**20


@dataclass(frozen=True)
class Ranked:
    """Sorted nearest collections of the T valid elements (ordered as `CollectionMinima`).

    `distances` (T, r) float32 ascending, +inf where fewer than r partners exist; `collections`
    (T, r) int16/int32 collection index (-1 at +inf); `nearest` (T, r) int16/int32 position of
    the nearest element inside that collection (-1 at +inf), or None when not requested.
    """

    distances: Tensor
    collections: Tensor
    nearest: Tensor | None

    @property
    def nbytes(self) -> int:
        """Bytes held by the lists."""
        parts = (self.distances, self.collections, self.nearest)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


def index_dtype(largest: int) -> torch.dtype:
    """The smallest signed integer type holding 0..largest and -1."""
    return torch.int16 if largest < 2**15 else torch.int32


def ranked_bytes(t: int, n: int, m: int, rank: int, nearest: bool) -> int:
    """Bytes of one `Ranked` for T elements of a batch of n collections with M positions."""
    size = 4 + index_dtype(n).itemsize + (index_dtype(m).itemsize if nearest else 0)
    return t * rank * size


def ranked_minima(
    view: Tensor,
    valid: Tensor,
    rank: int,
    *,
    base: Tensor | None = None,
    partners: Tensor | None = None,
    nearest: bool = False,
    options: EngineOptions | None = None,
    grid: Sequence[int] | None = None,
) -> Ranked:
    """The `rank` smallest `d(x, J)` of every valid element x, over partner collections J != own.

    `view` (N, M, C) float; `valid` (N, M) bool (checked by the caller); `base` (N, M) bool
    subset of `valid` (None = valid): only base elements are neighbours. `partners` (N, N)
    symmetric bool pairs to compare (None = all). `nearest`: also keep nearest positions.
    `grid`: the shape of the M positions (needed with `options.window`).
    """
    options = EngineOptions() if options is None else options
    n, m = valid.shape
    base = valid if base is None else base
    shadow = valid & ~base
    partners = ~torch.eye(n, dtype=torch.bool) if partners is None else partners
    t = int(valid.sum())
    row_of = torch.full((n, m), -1, dtype=torch.int64)
    row_of[valid] = torch.arange(t)
    values = torch.full((t, rank), torch.inf)
    collections = torch.full((t, rank), -1, dtype=index_dtype(n))
    positions = torch.full((t, rank), -1, dtype=index_dtype(m)) if nearest else None

    quiet = replace(options, progress=False)
    blocks = torch.arange(n).split(_block_collections(n, m, options.block_mb))
    pairs = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks))]
    for a, b in tqdm(pairs, desc="ranked distances", unit="block", disable=not options.progress, leave=False):
        members = blocks[a] if a == b else torch.cat([blocks[a], blocks[b]])
        # collections without base (or shadow) elements take no part: an empty one has no minimum
        owners = members[base[members].any(1)]
        shadows = members[shadow[members].any(1)]
        everyone = torch.cat([owners, shadows])
        plan = partners[everyone][:, owners]
        if a != b:  # pairs inside one block are computed when that block meets itself
            side = torch.isin(everyone, blocks[a])
            plan &= side[:, None] != side[None, : len(owners)]
        if not bool(plan.any()):
            continue
        local = len(owners)
        # shadow collections (query-only elements) meet the base collections only
        full_plan = torch.zeros(len(everyone), len(everyone), dtype=torch.bool)
        full_plan[:, :local] = plan
        full_plan[:local, local:] = plan[local:].T
        minima = scoped_minima(
            [view[everyone]], torch.cat([base[owners], shadow[shadows]]), grid=grid, partners=full_plan,
            nearest=nearest, options=quiet,
        )
        rows = torch.cat([row_of[owners][base[owners]], row_of[shadows][shadow[shadows]]])
        new_values = minima.distances[:, :local]
        new_collections = owners.to(collections.dtype).expand(len(rows), local)
        new_positions = minima.nearest[:, :local] if nearest else None
        _merge(values, collections, positions, rows, new_values, new_collections, new_positions)
    collections.masked_fill_(torch.isinf(values), -1)
    if positions is not None:
        positions.masked_fill_(torch.isinf(values), -1)
    return Ranked(distances=values, collections=collections, nearest=positions)


def _block_collections(n: int, m: int, block_mb: float) -> int:
    """Collections per block: a block pair's (2 b M) x (2 b) minima and nearest positions stay
    within `block_mb` (at least one collection)."""
    budget = block_mb * BYTES_PER_MB / 8
    return max(1, min(n, int(math.sqrt(budget / (4 * m)))))


def _merge(
    values: Tensor,
    collections: Tensor,
    positions: Tensor | None,
    rows: Tensor,
    new_values: Tensor,
    new_collections: Tensor,
    new_positions: Tensor | None,
) -> None:
    """Merge (len(rows), K) new entries into the running sorted top-r lists of `rows`, in place."""
    rank = values.shape[1]
    pooled = torch.cat([values[rows], new_values], 1)
    top = pooled.topk(rank, dim=1, largest=False, sorted=True)
    values[rows] = top.values
    collections[rows] = torch.cat([collections[rows], new_collections], 1).gather(1, top.indices)
    if positions is not None:
        positions[rows] = torch.cat([positions[rows], new_positions.to(positions.dtype)], 1).gather(1, top.indices)
