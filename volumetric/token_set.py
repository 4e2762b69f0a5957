"""`TokenSet`: the tokens of one collection (a volume or an image), and its one-file format.

A file is a safetensors archive: tensors `layer_<i>` ((*grid, D), float32 or float16) and `void`
(bool, (*grid)); its metadata holds the grid, the format version, the JSON `meta`, a SHA-256 of
all tensor bytes and, for a cache entry, the cache `key` it was written for. A truncated, partial
or bit-flipped file is refused on load rather than used, and so is one read under another key
(a token file moved or copied onto another scan's name). Writes are atomic (unique temporary
name in the same folder, then `os.replace`).

`save(..., dtype=torch.float16)` stores each layer in half precision (half the bytes; relative
rounding error <= 2^-11) unless a value lies outside float16's finite range, when that layer
stays float32; `load` always returns float32 layers.
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
from volumetric.cache_keys import TOKEN_FORMAT_VERSION
from volumetric.errors import InputFileError, VolscanError

# Largest finite float16 value: a layer with larger magnitudes is stored in float32.
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


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

    def as_stored(self, dtype: torch.dtype) -> TokenSet:
        """These tokens as `load` returns them after `save(..., dtype=dtype)` (float32 layers
        rounded through float16 where that storage applies), so a run that just computed them
        scores exactly what a later run reads from the cache."""
        layers = [_stored(t.detach().float().cpu(), dtype).float() for t in self.layers]
        return TokenSet(layers, self.void, self.grid, self.meta)

    def _tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {f"layer_{i}": _stored(t.detach().float().cpu(), dtype).contiguous() for i, t in enumerate(self.layers)}
        out["void"] = self.void.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike[str], *, key: str | None = None,
             dtype: torch.dtype = torch.float32) -> Path:
        """Write atomically to `path` (safetensors); returns the path. `key`: the cache key the
        file is written for (`load(path, key=...)` checks it); `dtype`: float32 or float16
        storage of the layers (see the module docstring)."""
        from safetensors.torch import save_file

        if dtype not in (torch.float32, torch.float16):
            raise VolscanError(f"token storage dtype must be float32 or float16, got {dtype}")
        path = Path(path)
        tensors = self._tensors(dtype)
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
        if key is not None:
            header["key"] = key
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: str | None = None) -> TokenSet:
        """Read a file written by `save`; any damage, a version mismatch or (when `key` is given)
        a file written for another cache key raises `InputFileError`."""
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
        if key is not None and header.get("key") != key:
            written = header.get("key")
            raise InputFileError(path, "token file was written for another scan or settings (cache key "
                                       f"{written[:12] + '…' if written else 'none'}, read as {key[:12]}…)")
        return cls([tensors[f"layer_{i}"].float() for i in range(n_layers)], tensors["void"], grid, meta)


def _stored(layer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`layer` (float32) as stored: in `dtype`, except float16 for values beyond its finite range."""
    if dtype != torch.float16:
        return layer
    fits = layer.numel() == 0 or bool(layer.abs().max() <= _FLOAT16_MAX)  # NaN compares False: float32
    return layer.half() if fits else layer
