"""Position-aware minima: `d(x, J)` over the elements of J near x's own grid cell.

With `EngineOptions.window = w`, for inputs on one shared grid (volumes registered to a template,
aligned images), every valid element x at cell p(x) is compared only with the valid elements y of
each other collection J whose cell lies within w cells of its own (Chebyshev distance:
max_k |p_k(y) - p_k(x)| <= w): `d_w(x, J) = min over those y of ||x - y||`. Where J has no valid
element in the window of x (its tissue ends earlier there), the window widens to the whole of J
for that pair (the global `d(x, J)`): every partner collection still gives a finite distance, so
the scorers downstream (top-k means, CoDeGraph's ranked lists and reference rank) read the same
contract as without a window. `window=None` never reaches this module (the global path,
`volumetric.engine.distances`, unchanged).

Layout and work. The operands are the global path's (`distances._operands`: same centring,
scale, offset and reduced-precision split), stored cell-major and dense: slot (c, j) = c N + j for
every cell c of the grid and collection j, with pads (far from everything) where j is void at c.
For each offset d of the half window (d lexicographically >= 0: ((2w+1)^D + 1) / 2 offsets), cell
c and cell c + d are one fixed step s = d . strides apart in the flattened grid, so a chunk of L
cells and the chunk s further on are two contiguous views, and ONE batched product
(L, N, C') x (L, N, C')^T gives the squared distances between every element at c and every
element at c + d, for all pairs of collections at once. Each block folds into the running minima
twice: as rows (element at c, collection j at c + d) and, transposed, as columns (element at
c + d, collection i at c). So every pair of elements within the window is computed once (d = 0:
in both orders); rows whose step wraps around a grid edge are masked; chunks with no valid cell
on either side are skipped. Cost: ((2w+1)^D + 1) / 2 x M x N^2 products of length C', against
T^2 / 2 without a window (T = valid elements): linear in the grid size, not quadratic. Memory: the
two dense operands (M N x C' each, void slots included) and the running minima (M x N x N, in the
products' dtype: the minimum of reduced-precision values is one of them, nothing is lost).
Pairs that `partners` leaves out are computed and then masked (a window already restricts the
work; pre-selection saves no time here).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from volumetric.devices import effective_precision, resolve_device
from volumetric.engine.distances import (
    DTYPES,
    PAD_DISTANCE,
    CollectionMinima,
    _block_elements,
    _even_chunks,
    _operands,
    _PaddedBank,
    collection_minima,
    element_minima,
)
from volumetric.engine.options import EngineOptions
from volumetric.errors import VolscanError


def scoped_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    *,
    grid: Sequence[int] | None = None,
    partners: Tensor | None = None,
    nearest: bool = False,
    options: EngineOptions | None = None,
) -> CollectionMinima:
    """`collection_minima` (global search), or `window_minima` when `options.window` is set.

    `grid`: the shape of the M positions (e.g. (16, 16, 16)); needed with a window only."""
    options = EngineOptions() if options is None else options
    if options.window is None:
        return collection_minima(layers, valid, partners=partners, nearest=nearest, options=options)
    return window_minima(layers, valid, grid, partners=partners, nearest=nearest, options=options)


def scoped_element_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    elements: Tensor,
    *,
    grid: Sequence[int] | None = None,
    partners: Tensor | None = None,
    options: EngineOptions | None = None,
) -> Tensor:
    """`element_minima` (global), or `window_element_minima` when `options.window` is set."""
    options = EngineOptions() if options is None else options
    if options.window is None:
        return element_minima(layers, valid, elements, partners=partners, options=options)
    return window_element_minima(layers, valid, elements, grid, partners=partners, options=options)


def check_grid(grid: Sequence[int] | None, m: int) -> tuple[int, ...]:
    """The grid shape as a tuple of positive ints whose product is M; a clear error otherwise."""
    if grid is None:
        raise VolscanError("window: position-aware scoring needs the grid shape of the M elements (grid=...)")
    shape = tuple(int(g) for g in grid)
    if not shape or any(g < 1 for g in shape) or math.prod(shape) != m:
        raise VolscanError(f"grid: shape {tuple(grid)} does not hold the M = {m} elements of each collection")
    return shape


def window_offsets(grid: tuple[int, ...], window: int, half: bool) -> list[tuple[int, ...]]:
    """Offsets d with max |d_k| <= window (clipped to the grid's extent), all of them or the half
    lexicographically >= 0 (d = 0 included)."""
    ranges = [range(-min(window, g - 1), min(window, g - 1) + 1) for g in grid]
    offsets = list(itertools.product(*ranges))
    return [d for d in offsets if d >= (0,) * len(grid)] if half else offsets


def window_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    grid: Sequence[int] | None,
    *,
    partners: Tensor | None = None,
    nearest: bool = False,
    options: EngineOptions,
) -> CollectionMinima:
    """`d_w(x, J)` for every valid element and partner collection (`collection_minima`'s result
    and arguments; `grid` the shape of the M positions, `options.window` = w)."""
    if nearest and len(layers) != 1:
        raise ValueError("nearest elements are defined per layer; pass a single layer")
    n, m = valid.shape
    shape = check_grid(grid, m)
    dev = resolve_device(options.device)
    precision = effective_precision(options.precision, dev)
    valid = valid.cpu()
    if partners is None:
        partners = ~torch.eye(n, dtype=torch.bool)
    counts = valid.sum(1)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    bank = _cell_bank(valid, dev)
    block_cells = max(1, _block_elements(options, dev) // (n * n))
    used = valid.any(0).to(dev)
    total: Tensor | None = None
    arg: Tensor | None = None
    for layer in layers:
        x = layer.to(dev)[valid.to(dev)].float()
        channels = x.shape[1]
        rows, cols, offset, scale = _operands(x, bank, n, DTYPES[precision])
        del x
        cols = cols[: n * m]
        dense_rows = _dense_rows(rows, bank.slots, n * m, channels)
        del rows
        out = torch.full((m, n, n), torch.inf, dtype=cols.dtype, device=dev)
        where = torch.full((m, n, n), -1, dtype=torch.int32, device=dev) if nearest else None
        offsets = window_offsets(shape, options.window, half=True)
        for d in tqdm(offsets, desc="window distances", unit="offset", disable=not options.progress, leave=False):
            _fold_offset(dense_rows, cols, shape, d, used, out, where, block_cells)
        dist = out.view(m * n, n)[bank.slots].float()
        found = None if where is None else where.view(m * n, n)[bank.slots]
        del out, where
        _widen_missing(dist, found, dense_rows, cols, bank, valid, owner, partners)
        del dense_rows, cols
        dist = dist.add_(offset).clamp_min_(0).sqrt_().mul_(scale)
        total = dist if total is None else total.add_(dist)
        arg = found
    compute = _computed_pairs(owner, partners, counts, torch.arange(len(owner)))
    total = total.div_(len(layers)).cpu().masked_fill_(~compute, torch.inf)
    if arg is not None:
        arg = arg.cpu().masked_fill_(~compute, -1)
    return CollectionMinima(distances=total, nearest=arg, valid=valid, owner=owner, precision=precision)


def window_element_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    elements: Tensor,
    grid: Sequence[int] | None,
    *,
    partners: Tensor | None = None,
    options: EngineOptions,
) -> Tensor:
    """Float32 `d_w(x, J)` (E, N) for chosen valid elements only, averaged over layers
    (`element_minima`'s result and arguments, with the window of `options.window`).

    The chosen rows are grouped by cell; for every offset of the full window one batched
    product (cells, rows per cell, C') x (cells, N, C')^T in fp32, whatever `options.precision`.
    """
    n, m = valid.shape
    shape = check_grid(grid, m)
    dev = resolve_device(options.device)
    valid = valid.cpu()
    if partners is None:
        partners = ~torch.eye(n, dtype=torch.bool)
    counts = valid.sum(1)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    compute = _computed_pairs(owner, partners, counts, elements)
    total = torch.zeros(len(elements), n)
    if len(elements) == 0:
        return total.masked_fill_(~compute, torch.inf)
    bank = _cell_bank(valid, dev)
    cell_of = (bank.slots[elements.to(dev)] // n).cpu()
    cells, group = torch.unique(cell_of, return_inverse=True)
    order = torch.argsort(group, stable=True)
    first = torch.searchsorted(group[order], torch.arange(len(cells)))
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group)) - first[group[order]]
    depth = int(rank.max()) + 1
    coords = _coordinates(cells, shape)
    strides = torch.tensor([math.prod(shape[k + 1 :]) for k in range(len(shape))])
    limits = torch.tensor(shape)
    for layer in layers:
        x = layer.to(dev)[valid.to(dev)].float()
        channels = x.shape[1]
        rows, cols, offset, scale = _operands(x, bank, n, torch.float32, rows_of=elements.to(dev))
        del x
        cols = cols[: n * m]
        per_cell = _void_rows(len(cells) * depth, rows.shape[1], channels, rows.dtype, dev)
        per_cell = per_cell.view(len(cells), depth, -1)
        per_cell[group.to(dev), rank.to(dev)] = rows
        del rows
        kernel = cols.view(m, n, -1)
        out = torch.full((len(cells), depth, n), torch.inf, device=dev)
        for d in window_offsets(shape, options.window, half=False):
            target = coords + torch.tensor(d)
            inside = ((target >= 0) & (target < limits)).all(1)
            if not bool(inside.any()):
                continue
            at = inside.nonzero().flatten().to(dev)
            partner_cells = (target[inside] * strides).sum(1).to(dev)
            block = torch.bmm(per_cell[at], kernel[partner_cells].transpose(1, 2))
            out[at] = torch.minimum(out[at], block)
        dist = out[group.to(dev), rank.to(dev)]
        flat_rows = per_cell.view(len(cells) * depth, -1)
        slot_rows = group.to(dev) * depth + rank.to(dev)
        _widen_missing(dist, None, flat_rows, cols, bank, valid, owner[elements], partners, slot_rows)
        total += dist.add_(offset).clamp_min_(0).sqrt_().mul_(scale).cpu()
    return total.div_(len(layers)).masked_fill_(~compute, torch.inf)


def _cell_bank(valid: Tensor, device: torch.device) -> _PaddedBank:
    """The global path's bank description in the cell-major dense layout: slot of each valid token
    = cell N + collection (tokens ordered collection by collection, as everywhere). One spare cell
    of pad slots follows the M cells: the slots are not in token order, and with more slots than
    tokens `_operands` always scatters the tokens to their slots (without void it would write them
    in token order)."""
    n, m = valid.shape
    counts = valid.sum(1)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    cells = valid.nonzero()[:, 1]
    return _PaddedBank(
        width=m + 1,
        slots=(cells * n + owner).to(device),
        positions=torch.empty(0, dtype=torch.int32),
        offsets=[0, *torch.cumsum(counts, 0).tolist()],
    )


def _void_rows(count: int, width: int, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(count, width) row operands of void slots: no features, the squared-norm part PAD_DISTANCE
    and the constant ones, so their product with any column is at least PAD_DISTANCE (as a pad
    column's with any row: the two never look like a neighbour)."""
    rows = torch.zeros(count, width, dtype=dtype, device=device)
    parts = (width - channels) // 2
    rows[:, channels] = PAD_DISTANCE
    rows[:, channels + parts :] = 1.0
    return rows


def _dense_rows(rows: Tensor, slots: Tensor, total: int, channels: int) -> Tensor:
    """(N M, C') row operands in the cell-major layout: the valid tokens' rows at their slots,
    void rows elsewhere."""
    dense = _void_rows(total, rows.shape[1], channels, rows.dtype, rows.device)
    dense[slots] = rows
    return dense


def _fold_offset(
    rows: Tensor, cols: Tensor, grid: tuple[int, ...], d: tuple[int, ...], used: Tensor,
    out: Tensor, where: Tensor | None, block_cells: int,
) -> None:
    """Fold the products between every cell c and c + d (d >= 0 lexicographically) into `out`
    (M, N, N): rows (element at c, collection at c + d) and, for d != 0, columns."""
    m, n = out.shape[:2]
    strides = [math.prod(grid[k + 1 :]) for k in range(len(grid))]
    step = sum(dk * sk for dk, sk in zip(d, strides))
    if step >= m:
        return
    cells = torch.arange(m - step, device=out.device)
    inside = torch.ones(m - step, dtype=torch.bool, device=out.device)
    for g, dk, sk in zip(grid, d, strides):
        coordinate = (cells // sk) % g + dk
        inside &= (coordinate >= 0) & (coordinate < g)
    useful = inside & used[: m - step] & used[step:]
    left, right = rows.view(m, n, -1), cols.view(m, n, -1)
    for c0, c1 in _even_chunks(0, m - step, block_cells):
        if not bool(useful[c0:c1].any()):
            continue
        block = torch.bmm(left[c0:c1], right[c0 + step : c1 + step].transpose(1, 2))
        outside = (~inside[c0:c1]).nonzero().flatten()
        if len(outside):  # the step wrapped around a grid edge: no such neighbour
            block.index_fill_(0, outside, torch.inf)
        _fold(block, out, where, c0, c1, c0 + step)
        if step:
            _fold(block.transpose(1, 2), out, where, c0 + step, c1 + step, c0)


def _fold(block: Tensor, out: Tensor, where: Tensor | None, c0: int, c1: int, source: int) -> None:
    """out[c0:c1] = min(out[c0:c1], block); `where` records the source cell (source + row) of
    each improved entry."""
    current = out[c0:c1]
    if where is None:
        torch.minimum(current, block, out=current)
        return
    better = block < current
    current.copy_(torch.where(better, block, current))
    cells = torch.arange(source, source + c1 - c0, dtype=torch.int32, device=out.device).view(-1, 1, 1)
    found = where[c0:c1]
    found.copy_(torch.where(better, cells, found))


def _widen_missing(
    dist: Tensor, found: Tensor | None, rows: Tensor, cols: Tensor, bank: _PaddedBank, valid: Tensor,
    owner: Tensor, partners: Tensor, row_slots: Tensor | None = None,
) -> None:
    """In place: pairs (x, J) with no valid element of J in x's window (only pads met, values
    >= PAD_DISTANCE) get the global minimum over J (one product per such J, rows that miss it
    against all of J's tokens). `row_slots` (R,): each row's operand in `rows` (default: the
    bank's slots of the T tokens)."""
    n = valid.shape[0]
    slots = bank.slots if row_slots is None else row_slots
    missing = (dist >= PAD_DISTANCE / 2).cpu() & partners[owner]
    missing[torch.arange(len(owner)), owner] = False
    for j in missing.any(0).nonzero().flatten().tolist():
        lo, hi = bank.offsets[j], bank.offsets[j + 1]
        if hi == lo:
            continue
        at = missing[:, j].nonzero().flatten().to(dist.device)
        values, nearest = (rows[slots[at]] @ cols[bank.slots[lo:hi]].T).min(1)
        dist[at, j] = values.float()
        if found is not None:
            found[at, j] = valid[j].nonzero().flatten().to(dist.device)[nearest].to(found.dtype)


def _computed_pairs(owner: Tensor, partners: Tensor, counts: Tensor, elements: Tensor) -> Tensor:
    """(E, N) bool: pairs with a distance (partner collection, not the element's own, not empty)."""
    compute = partners[owner[elements]] & (counts > 0)[None, :]
    compute[torch.arange(len(elements)), owner[elements]] = False
    return compute


def _coordinates(cells: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(K, D) int64 grid coordinates of flat cell indices (K,)."""
    coords = []
    for k, g in enumerate(grid):
        coords.append((cells // math.prod(grid[k + 1 :])) % g)
    return torch.stack(coords, 1)
