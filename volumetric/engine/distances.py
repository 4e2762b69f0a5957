"""Element-to-collection minimum distances `d(x, J)`, computed the fast way.

For every valid element `x` and every partner collection `J`, `d(x, J) = min_{y in J} ||x - y||`
(Euclidean). Each unordered pair of collections is computed once: one block of squared
distances `||a||^2 + ||b||^2 - 2 a.b` (one matrix product of augmented vectors) gives the row
minima (`d(a, J)` for `a` in `I`) and the column minima (`d(b, I)` for `b` in `J`).

Speed comes from few, large operations per block:
- Partner tokens are stored *padded*: collection `j` owns `P = max count` consecutive slots, its
  valid tokens first, then pad tokens whose augmented vector makes every distance to them huge.
  A block of `g` partner collections is then a (g, P, rows) tensor and `d(a, J)` for all of them
  is ONE reduction over the middle axis, instead of one reduction per partner collection (many
  small calls, which dominated the time). Padding costs `P / mean count - 1`
  extra products (a few % for 30 % random void).
- Products go through `volumetric.engine.gemm` (float32 on CPU: oneDNN, faster than torch.mm's
  MKL at these shapes). Blocks are bounded by `EngineOptions.block_mb` (default 32 MiB of
  float32, so a block stays in a 32 MiB L3 cache for its two reductions; docs/engine.md,
  "Matrix products"; on CUDA at least `GPU_BLOCK_MB`);
  torch.mm writes them into one reused buffer (no page faults of fresh allocations), oneDNN
  into its own.
- Void (invalid) elements are dropped before any product: never anyone's neighbour, no cost.
- `precision="bf16"` / `"fp16"`: operands in reduced precision, the squared norms split in a
  high and a low part (so they keep ~16 bits), products accumulated in fp32 by the GEMM, minima
  returned as fp32. The block itself is stored in the reduced type (torch's CPU GEMM returns it),
  so blocks hold `d^2 - offset`, with `offset` the typical nearest squared distance of the batch:
  near each minimum the stored values are small and their rounding (8 / 11 significant bits)
  costs little absolute precision (score errors about 10x smaller than storing `d^2`; docs/engine.md).

Features are centred on their mean (distances unchanged, norms smaller: less cancellation in the
expanded formula) and divided by a power of two that brings every norm to <= 1 (exact in binary
floating point; keeps fp16 far from overflow; the minima are scaled back).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from volumetric.devices import effective_precision, resolve_device
from volumetric.engine.gemm import rows_by_columns
from volumetric.engine.options import EngineOptions

logger = logging.getLogger(__name__)

BYTES_PER_MB = 2**20
GPU_BLOCK_MB = 1024.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Squared distance to a pad token: far above any real one (features are scaled to norms <= 1, so
# real squared distances are <= 4), and representable in fp16.
PAD_DISTANCE = 1.0e4


@dataclass(frozen=True)
class CollectionMinima:
    """`d(x, J)` for the T valid elements of a batch, on CPU.

    `distances` (T, N) float32: +inf at the element's own collection and at pairs not computed.
    `nearest` (T, N) int32 (half the memory of int64) or None: position (0..M-1) of the nearest
    element inside `J`, -1 where the distance is +inf. `valid` (N, M) bool; `owner` (T,) int64
    collection of each element; valid elements are ordered collection by collection, position
    by position. `precision`: the one the products used ("fp32" where a reduced precision
    fell back, e.g. fp16 on a CPU).
    """

    distances: Tensor
    nearest: Tensor | None
    valid: Tensor
    owner: Tensor
    precision: str = "fp32"

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
    options: EngineOptions | None = None,
    scored: int | None = None,
) -> CollectionMinima:
    """Minimum distances from each valid element to each partner collection.

    `layers`: checked (N, M, C_l) tensors; with several, distances are averaged over layers
    (`nearest` then needs exactly one layer, because the nearest element differs per layer).
    `valid`: checked (N, M) bool. `partners`: (N, N) symmetric bool of pairs to compute
    (None = all pairs). `options`: device, precision, block size, progress (the pair plan
    fields are not read here: `partners` is the plan). `scored`: only the elements of the first
    `scored` collections are read by the caller (reference scoring: the queries first); the
    minima of later collections' elements are then not reduced (left +inf), which halves the
    reductions of blocks between a scored and an unscored collection. None = all.
    """
    if nearest and len(layers) != 1:
        raise ValueError("nearest elements are defined per layer; pass a single layer")
    options = EngineOptions() if options is None else options
    n = valid.shape[0]
    dev = resolve_device(options.device)
    precision = effective_precision(options.precision, dev)
    if partners is None:
        partners = ~torch.eye(n, dtype=torch.bool)
    valid = valid.cpu()
    counts = valid.sum(1)
    owner = torch.repeat_interleave(torch.arange(n), counts)
    bank = _PaddedBank.build(valid, dev)
    block_elements = _block_elements(options, dev)

    total: Tensor | None = None
    arg: Tensor | None = None
    for layer in layers:
        dist, arg = _layer_minima(
            layer.to(dev)[valid.to(dev)].float(), bank, partners, nearest, precision, block_elements, options.progress,
            n if scored is None else scored,
        )
        total = dist if total is None else total.add_(dist)
    total = total.div_(len(layers)).cpu()
    return CollectionMinima(
        distances=total, nearest=None if arg is None else arg.cpu(), valid=valid, owner=owner, precision=precision
    )


def element_minima(
    layers: Sequence[Tensor],
    valid: Tensor,
    elements: Tensor,
    *,
    partners: Tensor | None = None,
    options: EngineOptions | None = None,
) -> Tensor:
    """Float32 `d(x, J)` (E, N) for chosen valid elements only, averaged over layers.

    `elements` (E,) int64: indices into the T valid elements (ordered as in `CollectionMinima`).
    Same arithmetic as `collection_minima` at precision "fp32" (same centring, scale, offset and
    products), so values equal that path's to float32 rounding; +inf at the element's own
    collection, at pairs `partners` leaves out and at empty collections. Rows that pair with the
    same collections (all of them without a plan; one group per subset with `subsets`) go
    together through blocks of those partner collections, one reduction per block as in
    `collection_minima`: about 2 E / T of a pairs-once fp32 run (each row against its partners
    only), plus building the fp32 operands of all T tokens (the peak memory of an fp32 run at
    that moment). `options.precision` is not read (always fp32).
    """
    options = EngineOptions() if options is None else options
    dev = resolve_device(options.device)
    n = valid.shape[0]
    valid = valid.cpu()
    if partners is None:
        partners = ~torch.eye(n, dtype=torch.bool)
    owner = torch.repeat_interleave(torch.arange(n), valid.sum(1))
    rows = torch.arange(len(elements))
    compute = partners[owner[elements]] & (valid.sum(1) > 0)[None, :]
    compute[rows, owner[elements]] = False
    total = torch.zeros(len(elements), n)
    if len(elements) == 0:
        return total.masked_fill_(~compute, torch.inf)
    # The own collection joins each row's pattern (computed, masked at the end) so that, without
    # a plan, all rows share one pattern and go through the products together.
    patterns = compute.clone()
    patterns[rows, owner[elements]] = True
    patterns, group_of = torch.unique(patterns, dim=0, return_inverse=True)
    bank = _PaddedBank.build(valid, dev)
    width = bank.width
    block_elements = _block_elements(options, dev)
    buffer = torch.empty(max(block_elements, width), device=dev)  # at least one row x one collection
    for layer in layers:
        chosen, cols_op, offset, scale = _operands(
            layer.to(dev)[valid.to(dev)].float(), bank, n, torch.float32, rows_of=elements.to(dev)
        )
        out = torch.full((len(elements), n), torch.inf, device=dev)
        for group, pattern in enumerate(patterns):
            members = torch.nonzero(group_of == group).flatten()
            runs = _contiguous_runs(torch.nonzero(pattern).flatten().tolist())
            for r0, r1 in _even_chunks(0, len(members), max(1, block_elements // width)):
                # one group (no plan): the rows in order, views instead of copies
                part = slice(r0, r1) if len(patterns) == 1 else members[r0:r1].to(dev)
                block_rows = chosen[part]
                for run in runs:
                    for j0, j1 in _even_chunks(run[0], run[-1] + 1, max(1, block_elements // ((r1 - r0) * width))):
                        dist = rows_by_columns(cols_op[j0 * width : j1 * width], block_rows, buffer)
                        out[part, j0:j1] = dist.view(j1 - j0, width, r1 - r0).amin(1).T
        total += out.add_(offset).clamp_min_(0).sqrt_().mul_(scale).cpu()
    return total.div_(len(layers)).masked_fill_(~compute, torch.inf)


def _block_elements(options: EngineOptions, device: torch.device) -> int:
    """Elements of one block of distances: `block_mb` of float32; GPUs need large blocks to be
    busy (and have the memory): the same code with at least GPU_BLOCK_MB there."""
    block_mb = options.block_mb if device.type == "cpu" else max(options.block_mb, GPU_BLOCK_MB)
    return max(1, int(block_mb * BYTES_PER_MB / 4))


@dataclass(frozen=True)
class _PaddedBank:
    """Where each valid token lives in the padded layout (collection j: slots j*P .. j*P+P-1).

    `width` P; `slots` (T,) int64 slot of each valid token; `positions` (N, P) int32 position in the grid
    of each slot, -1 for pads; `offsets` token index where each collection starts (N + 1).
    """

    width: int
    slots: Tensor
    positions: Tensor
    offsets: list[int]

    @staticmethod
    def build(valid: Tensor, device: torch.device) -> _PaddedBank:
        n = valid.shape[0]
        counts = valid.sum(1)
        width = int(counts.max())
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        t = offsets[-1]
        owner = torch.repeat_interleave(torch.arange(n), counts)
        rank = torch.arange(t) - torch.tensor(offsets[:-1])[owner]
        slots = owner * width + rank
        positions = torch.full((n * width,), -1, dtype=torch.int32)
        positions[slots] = valid.nonzero()[:, 1].to(torch.int32)
        if width * n > t:
            logger.debug("padded token bank: %d slots for %d tokens (+%.1f %% products)", width * n, t,
                         100.0 * (width * n / t - 1))
        return _PaddedBank(
            width=width,
            slots=slots.to(device),
            positions=positions.view(n, width).to(device),
            offsets=offsets,
        )


def _operands(
    x: Tensor, bank: _PaddedBank, n: int, dtype: torch.dtype, rows_of: Tensor | None = None
) -> tuple[Tensor, Tensor, float, float]:
    """Augmented row and (padded) column operands so that `cols @ rows.T` = squared distances
    minus `offset`.

    `x` (T, C) float32 valid tokens, a private copy (modified in place). Returns rows (T, C+a)
    (only those of the token indices `rows_of`, when given), cols (N*P, C+a) in `dtype`, the
    offset to add back to squared results and the power of two to multiply distances by
    (after the square root: its square may overflow float32).
    fp32: [a, |a|^2, 1] . [-2b, 1, |b|^2 - o]. Reduced precision: the norm terms are split into
    high + low parts, [a, hi, lo, 1, 1] . [-2b, 1, 1, hi', lo'], so they keep ~16 bits.
    """
    # Powers of two (exact): first the largest magnitude to 1 (so the mean and the norms cannot
    # overflow float32 for huge finite inputs), then, once centred, the largest norm to <= 1.
    low, high = torch.aminmax(x)  # no |x| copy of the whole bank
    peak = max(-float(low), float(high))
    scale = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0
    x.div_(scale)
    x.sub_(x.mean(0))
    largest = float(x.norm(dim=1).max())
    if largest > 0:
        to_unit = 2.0 ** math.ceil(math.log2(largest))
        x.div_(to_unit)
        scale *= to_unit
    sq = x.square().sum(1)
    offset = _typical_nearest_square(x, sq, bank.offsets)
    t, c = x.shape
    picked = slice(None) if rows_of is None else rows_of
    norm_rows, norm_cols = _split(sq[picked], dtype), _split(sq - offset, dtype)
    extra = 2 * len(norm_rows)
    width = c + extra
    rows = torch.empty(t if rows_of is None else len(rows_of), width, dtype=dtype, device=x.device)
    rows[:, :c] = x[picked]
    for k, part in enumerate(norm_rows):
        rows[:, c + k] = part
    rows[:, c + len(norm_rows) :] = 1.0
    padded = n * bank.width > t
    # Without pads every slot is written below: no zero fill, and one copy instead of two.
    cols = (torch.zeros if padded else torch.empty)(n * bank.width, width, dtype=dtype, device=x.device)
    values = torch.empty(t, width, dtype=dtype, device=x.device) if padded else cols
    values[:, :c] = x.mul_(-2)
    values[:, c : c + len(norm_cols)] = 1.0
    for k, part in enumerate(norm_cols):
        values[:, c + len(norm_cols) + k] = part
    if values is not cols:
        cols[bank.slots] = values
    pads = torch.ones(n * bank.width, dtype=torch.bool, device=x.device)
    pads[bank.slots] = False
    cols[pads, c + len(norm_cols)] = PAD_DISTANCE  # times the rows' constant 1
    return rows, cols, offset, scale


def _split(values: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """`values` (fp32) as one fp32 part, or as high + low parts in a reduced `dtype`."""
    if dtype == torch.float32:
        return [values]
    high = values.to(dtype)
    return [high, (values - high.float()).to(dtype)]


def _typical_nearest_square(x: Tensor, sq: Tensor, offsets: list[int], samples: int = 256) -> float:
    """Median squared distance from tokens sampled in collections 1.. to their nearest token in
    collection 0 (one small product).

    Blocks hold `d^2 - offset`: values near each minimum are then small, so rounding them (to the
    block's type, and inside the product) costs little absolute precision where it matters."""
    lo, hi, t = offsets[0], offsets[1], offsets[-1]
    if t - hi < 1 or hi == lo:
        return 0.0
    picks = torch.linspace(hi, t - 1, min(samples, t - hi), device=x.device).long()
    d2 = sq[picks, None] + sq[None, lo:hi] - 2 * (x[picks] @ x[lo:hi].T)
    return float(d2.amin(1).median().clamp_min(0))


def _layer_minima(
    x: Tensor,
    bank: _PaddedBank,
    partners: Tensor,
    nearest: bool,
    precision: str,
    block_elements: int,
    progress: bool,
    scored: int,
) -> tuple[Tensor, Tensor | None]:
    """(T, N) distances (and nearest positions) for one layer's valid tokens `x` (T, C) on device;
    only the rows of the first `scored` collections are reduced (`collection_minima`)."""
    n, width, offsets = len(bank.offsets) - 1, bank.width, bank.offsets
    dtype = DTYPES[precision]
    rows_op, cols_op, offset, scale = _operands(x, bank, n, dtype)
    del x
    # Results are kept per slot (pads included), so that every block writes plain slices.
    out = torch.full((n * width, n), torch.inf, device=rows_op.device)
    arg = torch.full((n * width, n), -1, dtype=torch.int32, device=rows_op.device) if nearest else None
    buffer = torch.empty(max(block_elements, width), dtype=dtype, device=rows_op.device)  # >= 1 row x 1 collection

    pairs = int(torch.triu(partners, 1).sum())
    bar = tqdm(total=pairs, desc="mutual distances", unit="pair", disable=not progress, leave=False)
    for i in range(n):
        later = (torch.nonzero(partners[i, i + 1 :]).flatten() + i + 1).tolist()
        if not later or offsets[i + 1] == offsets[i]:  # no partner, or no valid element to compare
            bar.update(len(later))
            continue
        for r0, r1 in _even_chunks(offsets[i], offsets[i + 1], max(1, block_elements // width)):
            per_block = max(1, block_elements // ((r1 - r0) * width))
            for run in _contiguous_runs(later):
                for j0, j1 in _even_chunks(run[0], run[-1] + 1, per_block):
                    c0, c1 = j0 * width, j1 * width
                    dist = rows_by_columns(cols_op[c0:c1], rows_op[r0:r1], buffer)
                    _reduce_block(dist, out, arg, bank, i, r0, r1, j0, j1, c0, c1, scored)
        bar.update(len(later))
    bar.close()
    empty = [j for j in range(n) if offsets[j + 1] == offsets[j]]
    if empty:  # their slots are all pads: no element, no distance
        out[:, empty] = torch.inf
        if arg is not None:
            arg[:, empty] = -1
    out = out[bank.slots].add_(offset).clamp_min_(0).sqrt_().mul_(scale)
    return out, None if arg is None else arg[bank.slots]


def _reduce_block(
    dist: Tensor, out: Tensor, arg: Tensor | None, bank: _PaddedBank,
    i: int, r0: int, r1: int, j0: int, j1: int, c0: int, c1: int, scored: int,
) -> None:
    """Fold one block (partner slots c0:c1 of collections j0:j1, x tokens r0:r1 of collection i)
    into `out` / `arg` (per slot): one reduction per direction, each only where its elements
    belong to the first `scored` collections."""
    s0 = i * bank.width + r0 - bank.offsets[i]
    s1 = s0 + r1 - r0
    # d(b, I) for every partner slot b (of a scored collection), combined over the row blocks of I.
    kept = min(c1, scored * bank.width) - c0
    if kept > 0:
        current = out[c0 : c0 + kept, i]
        if arg is None:
            torch.minimum(current, dist[:kept].amin(1).float(), out=current)
        else:
            values, where = dist[:kept].min(1)
            values = values.float()
            better = values < current
            current.copy_(torch.where(better, values, current))
            found = bank.positions[i, r0 - bank.offsets[i] + where]
            nearest_so_far = arg[c0 : c0 + kept, i]
            nearest_so_far.copy_(torch.where(better, found, nearest_so_far))
    if i >= scored:
        return
    # d(a, J) for every token a of the row block and every J of the block: one reduction.
    grouped = dist.view(j1 - j0, bank.width, r1 - r0)
    if arg is None:
        out[s0:s1, j0:j1] = grouped.amin(1).T
    else:
        values, where = grouped.min(1)
        out[s0:s1, j0:j1] = values.T
        arg[s0:s1, j0:j1] = torch.gather(bank.positions[j0:j1], 1, where).T


def _even_chunks(start: int, stop: int, most: int) -> list[tuple[int, int]]:
    """Split range(start, stop) into the fewest near-equal chunks of at most `most` items."""
    pieces = max(1, math.ceil((stop - start) / most))
    bounds = [start + (stop - start) * k // pieces for k in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _contiguous_runs(collections: list[int]) -> list[list[int]]:
    """Group sorted collection ids into runs of consecutive ids (adjacent in the token bank, so a
    block of partners is a view, not a copy)."""
    runs: list[list[int]] = []
    for j in collections:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs
