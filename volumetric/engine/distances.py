"""Element-to-collection minimum distances `d(x, J)`, computed the fast way.

For every valid element `x` and every partner collection `J`, `d(x, J) = min_{y in J} ||x - y||`
(Euclidean). Each unordered pair of collections is computed once: one block of squared
distances `||a||^2 + ||b||^2 - 2 a.b` (a matrix product, on the GPU when there is one) gives the
row minima (`d(a, J)` for `a` in `I`) and the column minima (`d(b, I)` for `b` in `J`). Blocks
are bounded by `block_mb`, so nothing of size (N*M)^2 is ever built; the square root is taken
only on the minima. Void (invalid) elements are dropped before any product, so they are never
anyone's neighbour and cost nothing (30 % void saves about half of the work).

Features are centred on their mean first: distances do not change, but the norms shrink, which
reduces float32 cancellation in the expanded formula.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from volumetric.devices import resolve_device

logger = logging.getLogger(__name__)

BYTES_PER_MB = 2**20


@dataclass(frozen=True)
class CollectionMinima:
    """`d(x, J)` for the T valid elements of a batch, on CPU.

    `distances` (T, N) float32: +inf at the element's own collection and at pairs not computed.
    `nearest` (T, N) int32 (half the memory of int64) or None: position (0..M-1) of the nearest
    element inside `J`, -1 where the distance is +inf. `valid` (N, M) bool; `owner` (T,) int64
    collection of each element; valid elements are ordered collection by collection, position
    by position.
    """

    distances: Tensor
    nearest: Tensor | None
    valid: Tensor
    owner: Tensor

    def to_grid(self, values: Tensor, fill: float) -> Tensor:
        """Scatter per-element `values` (T, ...) back to (N, M, ...), `fill` at invalid elements."""
        out = torch.full((*self.valid.shape, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.valid] = values
        return out


def collection_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    *,
    partners: Tensor | None = None,
    nearest: bool = False,
    device: str | torch.device | None = None,
    half: bool = False,
    block_mb: float = 256.0,
    progress: bool = True,
) -> CollectionMinima:
    """Minimum distances from each valid element to each partner collection.

    `layers`: checked (N, M, C_l) tensors; with several, distances are averaged over layers
    (`nearest` then needs exactly one layer, because the nearest element differs per layer).
    `valid`: checked (N, M) bool. `partners`: (N, N) symmetric bool of pairs to compute
    (None = all pairs). `half`: float16 products on CUDA (norms and minima stay float32).
    `block_mb`: memory for one block of squared distances (float32), in MiB.
    """
    if nearest and len(layers) != 1:
        raise ValueError("nearest elements are defined per layer; pass a single layer")
    n = valid.shape[0]
    dev = resolve_device(device)
    if half and dev.type != "cuda":
        logger.warning("half precision needs CUDA; computing in float32 on %s", dev)
        half = False
    if partners is None:
        partners = ~torch.eye(n, dtype=torch.bool)
    block_elements = max(1, int(block_mb * BYTES_PER_MB / 4))
    counts = valid.sum(1)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    positions = valid.nonzero()[:, 1].to(torch.int32)

    total: Tensor | None = None
    arg: Tensor | None = None
    for layer in layers:
        dist, arg = _layer_minima(
            layer.to(dev)[valid.to(dev)].float(), counts, partners, positions.to(dev), nearest, half,
            block_elements, progress,
        )
        total = dist if total is None else total.add_(dist)
    total = total.div_(len(layers)).cpu()
    return CollectionMinima(
        distances=total, nearest=None if arg is None else arg.cpu(), valid=valid.cpu(), owner=owner
    )


def _layer_minima(
    x: Tensor,
    counts: Tensor,
    partners: Tensor,
    positions: Tensor,
    nearest: bool,
    half: bool,
    block_elements: int,
    progress: bool,
) -> tuple[Tensor, Tensor | None]:
    """(T, N) distances (and nearest positions) for one layer's valid tokens `x` (T, C) on
    device; `x` is a private copy, modified in place to keep peak memory at two token copies."""
    n = len(counts)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    x.sub_(x.mean(0))
    sq = x.square().sum(1)
    if half:
        rows_op = cols_op = x.half()
    else:
        # Augmented vectors make one matrix product return squared distances directly:
        # [a, |a|^2, 1] . [-2b, 1, |b|^2] = |a|^2 + |b|^2 - 2 a.b
        t, c = x.shape
        rows_op = torch.empty(t, c + 2, device=x.device)
        rows_op[:, :c], rows_op[:, c], rows_op[:, c + 1] = x, sq, 1.0
        cols_op = torch.cat([x.mul_(-2), torch.ones_like(sq)[:, None], sq[:, None]], 1)
    del x
    out = torch.full((len(sq), n), torch.inf, device=sq.device)
    arg = torch.full((len(sq), n), -1, dtype=torch.int32, device=sq.device) if nearest else None
    biggest = int(counts.max())

    def block(r0: int, r1: int, c0: int, c1: int) -> Tensor:
        # Laid out (columns, rows): each partner collection is then a contiguous run of rows, and
        # both reductions below run over contiguous memory (a third less time than the reverse).
        if not half:
            return cols_op[c0:c1] @ rows_op[r0:r1].T
        prod = (cols_op[c0:c1] @ rows_op[r0:r1].T).float()
        return prod.mul_(-2).add_(sq[c0:c1, None]).add_(sq[None, r0:r1])

    pairs = int(torch.triu(partners, 1).sum())
    bar = tqdm(total=pairs, desc="mutual distances", unit="pair", disable=not progress, leave=False)
    for i in range(n):
        later = (torch.nonzero(partners[i, i + 1 :]).flatten() + i + 1).tolist()
        if not later:
            continue
        rows_per_block = max(1, min(int(counts[i]), block_elements // biggest))
        for r0 in range(offsets[i], offsets[i + 1], rows_per_block):
            r1 = min(r0 + rows_per_block, offsets[i + 1])
            for run in _contiguous_runs(later, offsets, block_elements // (r1 - r0)):
                c0, c1 = offsets[run[0]], offsets[run[-1] + 1]
                dist = block(r0, r1, c0, c1)  # (c1 - c0, r1 - r0)
                # d(b, I) for every b of the run, combined over row blocks of I
                if nearest:
                    values, where = dist.min(1)
                    better = values < out[c0:c1, i]
                    out[c0:c1, i] = torch.where(better, values, out[c0:c1, i])
                    arg[c0:c1, i] = torch.where(better, positions[r0 + where], arg[c0:c1, i])
                else:
                    out[c0:c1, i] = torch.minimum(out[c0:c1, i], dist.amin(1))
                # d(a, J) for every a of this row block and every J of the run
                for j in run:
                    seg = dist[offsets[j] - c0 : offsets[j + 1] - c0]
                    if nearest:
                        values, where = seg.min(0)
                        out[r0:r1, j] = values
                        arg[r0:r1, j] = positions[offsets[j] + where]
                    else:
                        out[r0:r1, j] = seg.amin(0)
        bar.update(len(later))
    bar.close()
    return out.clamp_min_(0).sqrt_(), arg


def _contiguous_runs(collections: list[int], offsets: list[int], max_columns: int) -> list[list[int]]:
    """Group sorted collection ids into runs that are adjacent in the token bank (so a block is a
    view, not a copy) and hold at most `max_columns` tokens (at least one collection each)."""
    runs: list[list[int]] = []
    for j in collections:
        if runs and runs[-1][-1] == j - 1 and offsets[j + 1] - offsets[runs[-1][0]] <= max_columns:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs
