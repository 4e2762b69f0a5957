"""Torch device selection shared by the tokenizer, the engine and the CLI."""

from __future__ import annotations

import logging

import torch

from volumetric.errors import VolscanError

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" = the first CUDA GPU when available, else CPU; an unavailable or
    unknown device is a `VolscanError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise VolscanError(f"device: cannot parse {device!r} ({error}); use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise VolscanError(f"device: expected auto, cpu, cuda or cuda:N, got {str(parsed)!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise VolscanError(f"device: {parsed} requested but torch sees no CUDA GPU; use cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise VolscanError(f"device: {parsed} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return parsed


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bfloat16 matrices natively (AMX-BF16 or AVX512-BF16, read from
    the `cpuinfo` flags); elsewhere torch emulates bf16 products, slower than float32."""
    try:
        with open(cpuinfo, encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def effective_precision(precision: str, device: torch.device) -> str:
    """The precision the engine will use for `precision` ("fp32", "bf16", "fp16") on `device`,
    with a logged warning where the request cannot be honoured or would be slow."""
    if device.type == "cuda" or precision == "fp32":
        return precision
    if precision == "fp16":
        logger.warning("precision fp16 needs CUDA; computing in fp32 on %s", device)
        return "fp32"
    if not cpu_has_native_bf16():
        logger.warning(
            "precision bf16: this CPU has neither AMX-BF16 nor AVX512-BF16, so torch emulates bf16 "
            "products and they are likely slower than fp32"
        )
    return precision
