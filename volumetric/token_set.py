"""`TokenSet`: the tokens of one collection (a volume or an image), and its one-file format.

A file is a safetensors archive: tensors `layer_<i>` (float32, (*grid, D)) and `void` (bool,
(*grid)); its metadata holds the grid, the format version, the JSON `meta` and a SHA-256 of all
tensor bytes, so a truncated, partial or bit-flipped file is refused on load rather than used.
Writes are atomic (unique temporary name in the same folder, then `os.replace`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from volumetric.atomic_files import atomic_path
from volumetric.errors import InputFileError, VolscanError

# Bump whenever token construction or the file layout changes: cache keys include it.
# 2: intermediate tokens through the backbone's final norm (issue 15 / 12).
TOKEN_FORMAT_VERSION = 2


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bool else t.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TokenSet:
    """Tokens of one collection.

    `layers`: one float32 tensor (*grid, D) per backbone layer (D = 3r for volumes, r for
    images); `void`: (*grid) bool, True where the element is background; `grid`: the token
    grid shape, (g, g, g) or (h, w); `meta`: JSON-serialisable provenance (backbone, settings,
    `random_weights`).
    """

    layers: list[torch.Tensor]
    void: torch.Tensor
    grid: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        if not self.layers:
            raise VolscanError("a TokenSet needs at least one layer")
        for i, layer in enumerate(self.layers):
            if tuple(layer.shape[:-1]) != self.grid:
                raise VolscanError(f"layer {i} has shape {tuple(layer.shape)}, expected grid {self.grid} + (D,)")
        if tuple(self.void.shape) != self.grid or self.void.dtype != torch.bool:
            raise VolscanError(f"void must be a bool tensor of shape {self.grid}")

    @property
    def random_weights(self) -> bool:
        """True when the tokens came from a randomly initialised backbone (meaningless scores)."""
        return bool(self.meta.get("random_weights", False))

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"layer_{i}": t.detach().float().cpu().contiguous() for i, t in enumerate(self.layers)}
        out["void"] = self.void.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to `path` (safetensors); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = self._tensors()
        try:
            meta_json = json.dumps(self.meta, sort_keys=True)
        except TypeError as exc:
            raise VolscanError(f"TokenSet meta is not JSON-serialisable: {exc}") from None
        header = {
            "format_version": str(TOKEN_FORMAT_VERSION),
            "grid": json.dumps(list(self.grid)),
            "n_layers": str(len(self.layers)),
            "meta": meta_json,
            "sha256": _digest(tensors),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenSet:
        """Read a file written by `save`; any damage or version mismatch raises `InputFileError`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise InputFileError(path, f"not a readable token file ({exc})") from None
        version = header.get("format_version")
        if version != str(TOKEN_FORMAT_VERSION):
            raise InputFileError(path, f"token format version {version}, expected {TOKEN_FORMAT_VERSION}")
        try:
            n_layers = int(header["n_layers"])
            grid = tuple(json.loads(header["grid"]))
            meta = json.loads(header["meta"])
            expected = header["sha256"]
        except (KeyError, ValueError, TypeError) as exc:
            raise InputFileError(path, f"token file header is damaged ({exc})") from None
        if set(tensors) != {f"layer_{i}" for i in range(n_layers)} | {"void"}:
            raise InputFileError(path, "token file is missing tensors")
        if _digest(tensors) != expected:
            raise InputFileError(path, "token file checksum mismatch (corrupt)")
        return cls([tensors[f"layer_{i}"] for i in range(n_layers)], tensors["void"], grid, meta)
