"""Johnson-Lindenstrauss random projection of token features.

One Gaussian matrix with entries N(0, 1/out_dim), drawn from a CPU `torch.Generator` seeded with
`seed`: the same bits in every process and run (for one torch version; `matrix_fingerprint`
lets caches notice if that ever changes). Squared distances are preserved in expectation and
each one's ratio is distributed as chi2(out_dim)/out_dim, whatever the data.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from volumetric.errors import VolscanError


def jl_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """Gaussian JL matrix (in_dim, out_dim) float32 on CPU, entries N(0, 1/out_dim)."""
    for label, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VolscanError(f"projection {label} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VolscanError(f"projection seed must be an integer, got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=gen, dtype=torch.float32) / out_dim**0.5


def matrix_fingerprint(matrix: torch.Tensor) -> str:
    """Short hex digest of a projection matrix's bytes (for cache keys)."""
    return hashlib.sha256(matrix.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def normalize_project(features: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """L2-normalise (..., in_dim) features along the last axis, then project to (..., out_dim) float32."""
    features = F.normalize(features.float(), dim=-1)
    return features @ matrix.to(features.device)
