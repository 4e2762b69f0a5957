"""Torch device selection shared by the tokenizer, the engine and the CLI."""

from __future__ import annotations

import torch

from volumetric.errors import VolscanError


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
