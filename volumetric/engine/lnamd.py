"""LNAMD as MuSc computes it (`models/modules/_LNAMD.py`), on 2D (h, w) and 3D (g, g, g) grids.

Per collection and layer:
1. LayerNorm over the whole token map: one mean and one variance over all channels and all
   positions (MuSc: `torch.nn.LayerNorm([C, H, W])`, unit weight, zero bias, eps 1e-5);
2. each token replaced by the per-channel mean of its `r x r` (3D: `r x r x r`) neighbourhood
   with zero padding at the border (MuSc: `Unfold(padding=(r-1)/2)` then adaptive average
   pooling of the (C, r, r) patch to C values: the sum over the neighbourhood / r^2);
3. L2 normalisation along channels (MuSc's `features /= features.norm(dim=-1)`).
`r = 1` is the identity in step 2.

The 3D form is void-aware: the LayerNorm statistics run over valid (brain) tokens only, and
void tokens count as zeros in step 2, exactly like the zero padding outside the grid (after
step 1 zero is the map's mean token, so a border or void neighbour pulls towards the mean, as in
MuSc). Since step 3 discards the scale, this equals the mean over valid neighbours only. Void
outputs are zeros; void values never leak into valid ones.
`layer_norm=False` skips step 1 (an ablation switch: our earlier departure).

`border="shift"` departs from MuSc at the grid's edge only: instead of padding, a window that
would reach past the grid is moved inside it (along each axis its start is clamped to
[0, n - r]), so every token averages r^d in-grid tokens (grids narrower than r: the whole axis).
Why: with zero padding a corner token averages 4 of 9 tokens (r = 3, 2D), so its aggregate is
noisier than an interior token's and sits farther from every other image's tokens; in 2D, where
the grid's edge is the image's edge and tissue, that made border tokens the hottest of healthy
images (docs/engine.md, "Border tokens in 2D"). Void tokens still count as zeros. 3D grids frame
the brain with background, so the screen keeps MuSc's padding there ("zero", the default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from volumetric.errors import VolscanError

LAYER_NORM_EPS = 1e-5
BORDERS = ("zero", "shift")


def lnamd(grid_features: Tensor, r: int, valid: Tensor | None = None, *, layer_norm: bool = True,
          border: str = "zero") -> Tensor:
    """Aggregate each token with its r-neighbourhood (MuSc's LNAMD).

    `grid_features`: (N, h, w, C) or (N, g, g, g, C) float. `r`: odd positive int.
    `valid`: (N, *grid) bool or None (all valid). `border`: "zero" (MuSc's zero padding) or
    "shift" (windows moved inside the grid; module docstring). Returns float32 of the same
    shape, L2-normalised along C, zeros at void tokens.
    """
    if not isinstance(grid_features, Tensor) or grid_features.ndim not in (4, 5):
        shape = tuple(grid_features.shape) if isinstance(grid_features, Tensor) else type(grid_features).__name__
        raise VolscanError(f"grid_features: expected (N, h, w, C) or (N, g, g, g, C), got {shape}")
    if not isinstance(r, int) or r < 1 or r % 2 == 0:
        raise VolscanError(f"LNAMD radius r: must be an odd positive integer, got {r!r}")
    if border not in BORDERS:
        raise VolscanError(f"LNAMD border: expected one of {', '.join(BORDERS)}, got {border!r}")
    grid = tuple(grid_features.shape[1:-1])
    if valid is None:
        valid = torch.ones(grid_features.shape[:-1], dtype=torch.bool, device=grid_features.device)
    elif tuple(valid.shape) != tuple(grid_features.shape[:-1]) or valid.dtype != torch.bool:
        raise VolscanError(
            f"valid: expected bool of shape {tuple(grid_features.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    weight = valid.to(grid_features.device, torch.float32).unsqueeze(-1)  # (N, *grid, 1)
    x = grid_features.float() * weight
    if layer_norm:
        dims = tuple(range(1, x.ndim))
        count = (weight.sum(dims, keepdim=True) * x.shape[-1]).clamp_min(1.0)
        mean = x.sum(dims, keepdim=True) / count
        var = ((x - mean).square() * weight).sum(dims, keepdim=True) / count
        x = (x - mean) * torch.rsqrt(var + LAYER_NORM_EPS) * weight
    if r > 1 and border == "shift":
        for axis in range(1, x.ndim - 1):
            x = _shifted_window_sum(x, r, axis)
        x = x * weight
    elif r > 1:
        pool = F.avg_pool2d if len(grid) == 2 else F.avg_pool3d
        # explicit zero padding: pooling refuses grids smaller than the kernel even when padded
        padded = F.pad(x.movedim(-1, 1), [r // 2] * (2 * len(grid)))
        x = pool(padded, r, stride=1).movedim(1, -1) * weight
    return F.normalize(x, dim=-1)


def _shifted_window_sum(x: Tensor, r: int, axis: int) -> Tensor:
    """Sum of `r` consecutive entries along `axis`, the window centred where it fits and moved
    inside the axis where it would not (the whole axis when it has fewer than `r` entries)."""
    n = x.shape[axis]
    if n <= r:
        return x.sum(axis, keepdim=True).expand_as(x).contiguous()
    cumulative = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)), x.cumsum(axis)], axis)
    start = (torch.arange(n, device=x.device) - r // 2).clamp(0, n - r)
    return cumulative.index_select(axis, start + r) - cumulative.index_select(axis, start)
