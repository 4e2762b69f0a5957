"""Volumetric tokens, the modality-agnostic scoring engine (mutual scoring + CoDeGraph) and metrics."""

from volumetric.errors import InputFileError, VolscanError

__all__ = ["InputFileError", "VolscanError"]
