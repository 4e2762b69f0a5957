"""`a @ b.T` on the fastest exact matrix-product kernel torch has for the device.

On CPUs torch's `mm` runs float32 through MKL, while oneDNN (also inside torch, and already what
`mm` uses for bfloat16) computes the same IEEE float32 product markedly faster at the engine's
block shapes (`benchmarks/engine.py --case none --gemm`; figures in docs/engine.md, "Matrix
products", and docs/results/2026-11-30-engine-benchmark.md). So float32 products on CPU go
through oneDNN's linear operator (`torch.ops.mkldnn._linear_pointwise`, the kernel
torch.compile's CPU backend emits), checked once per process against a float64 product; when it is
missing or disagrees, `torch.mm` is used. CUDA and other dtypes always use `torch.mm`.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# oneDNN and MKL sum in different orders: float32 results differ by rounding only.
_AGREEMENT = 1e-5


def rows_by_columns(a: Tensor, b: Tensor, buffer: Tensor) -> Tensor:
    """`a @ b.T` (P, R) for `a` (P, K) and `b` (R, K) of one dtype.

    `buffer`: a flat tensor of at least P * R elements of that dtype, reused across blocks (no
    page faults of fresh allocations) by `torch.mm`; oneDNN's operator has no output argument and
    returns its own tensor (copying it into the buffer would cost one more pass over the block).
    """
    if a.device.type == "cpu" and a.dtype == torch.float32 and _onednn_agrees():
        return _onednn_linear(a, b)
    return torch.mm(a, b.T, out=buffer[: a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0]))


def _onednn_linear(a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@functools.cache
def _onednn_agrees() -> bool:
    """Whether oneDNN's float32 linear exists here and equals a float64 product (to 1e-5 of its
    largest entry) on a small random product."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(67, 131, generator=generator)
    b = torch.randn(45, 131, generator=generator)
    try:
        got = _onednn_linear(a, b)
    except RuntimeError as error:  # an op with another signature in this torch version
        logger.debug("oneDNN float32 linear unavailable (%s); using torch.mm", error)
        return False
    expected = a.double() @ b.double().T
    scale = float(expected.abs().max())
    agrees = got.shape == expected.shape and float((got.double() - expected).abs().max()) <= _AGREEMENT * scale
    if not agrees:
        logger.debug("oneDNN float32 linear disagrees with a float64 product; using torch.mm")
    return agrees
