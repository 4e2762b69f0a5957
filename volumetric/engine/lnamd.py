"""LNAMD (MuSc's local neighbourhood aggregation) on 2D (h, w) and 3D (g, g, g) token grids.

Each token is replaced by the mean of its `r x r` (2D) or `r x r x r` (3D) neighbourhood
(`r = 1` keeps it), then L2-normalised, so every r lives on the same unit sphere and the plain
Euclidean distances of mutual scoring stay comparable across r.

What we keep from MuSc and why:
- Neighbourhood mean: kept; it is what lets a token "see" a lesion spanning several cubes.
- Void tokens (outside the brain) never mix into valid ones: the mean runs over *valid*
  neighbours only (masked sum / valid count); void outputs are zeros. At grid borders the mean
  likewise runs over the neighbours that exist (MuSc pads with zeros instead, which shrinks
  border tokens towards the origin).
- Final L2 normalisation: kept (also for r = 1), as in MuSc.
- Layer norm over channels and adaptive average pooling of channels to a fixed width: dropped.
  Our tokens are already L2-normalised Gaussian (JL) projections of a fixed width, so a
  per-token layer norm only re-centres near-zero-mean channels, and pooling adjacent JL
  channels would be a second, worse random projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from volumetric.errors import VolscanError


def lnamd(grid_features: Tensor, r: int, valid: Tensor | None = None) -> Tensor:
    """Aggregate each token with its r-neighbourhood.

    `grid_features`: (N, h, w, C) or (N, g, g, g, C) float. `r`: odd positive int.
    `valid`: (N, *grid) bool or None (all valid). Returns float32 of the same shape,
    L2-normalised along C, zeros at void tokens.
    """
    if not isinstance(grid_features, Tensor) or grid_features.ndim not in (4, 5):
        shape = tuple(grid_features.shape) if isinstance(grid_features, Tensor) else type(grid_features).__name__
        raise VolscanError(f"grid_features: expected (N, h, w, C) or (N, g, g, g, C), got {shape}")
    if not isinstance(r, int) or r < 1 or r % 2 == 0:
        raise VolscanError(f"LNAMD radius r: must be an odd positive integer, got {r!r}")
    grid = tuple(grid_features.shape[1:-1])
    if valid is None:
        valid = torch.ones(grid_features.shape[:-1], dtype=torch.bool, device=grid_features.device)
    elif tuple(valid.shape) != tuple(grid_features.shape[:-1]) or valid.dtype != torch.bool:
        raise VolscanError(
            f"valid: expected bool of shape {tuple(grid_features.shape[:-1])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    weight = valid.to(grid_features.device, torch.float32).unsqueeze(1)
    x = grid_features.float() * weight.movedim(1, -1)
    if r > 1:
        pool = F.avg_pool2d if len(grid) == 2 else F.avg_pool3d
        pad = [r // 2] * (2 * len(grid))
        # Both sums use the same (constant) divisor, which cancels in the ratio; padding is
        # explicit because pooling refuses grids smaller than the kernel even when padded.
        summed = pool(F.pad(x.movedim(-1, 1), pad), r, stride=1)
        count = pool(F.pad(weight, pad), r, stride=1)
        x = (summed / count.clamp_min(torch.finfo(torch.float32).tiny)).movedim(1, -1)
        x = x * weight.movedim(1, -1)
    return F.normalize(x, dim=-1)
