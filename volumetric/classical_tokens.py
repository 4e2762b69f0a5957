"""Weights-free element tokens: multi-scale intensity and texture statistics per p^3 cube (or p^2 patch).

`ClassicalTokenizer` is the baseline to compare the ViT path against, a fast CPU triage mode,
and what lets tests and benchmarks without pretrained weights measure *detection*. It returns
the same `TokenSet` as `volumetric.tokens` (same p = 14 grid, void rule, cache and engine) for a
cube (S, S, S) or an image (H, W) / (H, W, 3). Per volume or image, independent of the batch (so
cached like ViT tokens):
1. Intensities: brain voxels (mask, or voxels != 0) centred on their median and divided by their
   inter-quartile range (a lesion of a few percent of the brain moves neither; nothing is
   clipped, so a lesion brighter than CSF stays brighter); outside the brain the value of 0.
2. Responses over the whole volume (a cube sees its surroundings): the intensity `u`, Gaussian
   smoothing `G_s * u` at each scale s (default 1, 2, 4 voxels), the gradient magnitude
   `|grad(G_s * u)|` and the scale-normalised Laplacian of Gaussian `s^2 lap(G_s * u)`. Past the
   array's edge the filters see it mirrored (`BOUNDARY`: repeating the edge value would give an
   image's frame cells a profile of their own).
3. Per cube, over its brain voxels: mean and standard deviation of every response, minimum and
   maximum of the finest smoothing and of every LoG (a lesion smaller than a cube shows in the
   extremes before it moves the mean).
4. Two token layers, as the ViT path has two backbone layers: the intensity and finest scale,
   then the coarser scales.

At scoring time `standardize_batch` z-scores every channel over the batch's valid tokens (the
features have unrelated units; a fixed transform would have to guess their spread) and appends a
constant reference, two opposite channels `+-c / sqrt(2)`, c = `REFERENCE_SCALE` sqrt(D): LNAMD
L2-normalises every token, which would keep only the direction of a token whose signal is its
length; with the reference that normalisation is a smooth projection that keeps distances
between typical tokens nearly proportional, and the pair sums to zero so it leaves LayerNorm's
mean alone (bright and dark profiles stay equally far). Why each choice, what was tried, what
the features cannot see, and their speed and detection: docs/tokens.md, "Classical tokens".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from volumetric.backbones import BackboneIdentity
from volumetric.cache_keys import TOKEN_FORMAT_VERSION
from volumetric.errors import VolscanError
from volumetric.token_set import TokenSet
from volumetric.tokens import DEFAULT_VOID_FRACTION, void_from_mask

log = logging.getLogger(__name__)

CLASSICAL_BACKBONE = "classical"
DEFAULT_SCALES = (1.0, 2.0, 4.0)
PATCH = 14
BATCH_STANDARDIZE = "batch_standardize"
# The channel spread below which a feature is treated as constant over the batch (left centred, unscaled).
_MIN_STD = 1e-6
# How the filters extend the array past its edge (module docstring, step 2; docs/engine.md, "Border tokens in 2D").
BOUNDARY = "reflect"
# Length of the constant reference `standardize_batch` appends, in units of sqrt(D) (module docstring).
REFERENCE_SCALE = 4.0

ArrayLike = np.ndarray | torch.Tensor


def _numpy(array: ArrayLike, what: str) -> np.ndarray:
    raw = array.detach().cpu().float().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise VolscanError(f"{what} must be real-valued numbers, got dtype {raw.dtype}")
    values = raw.astype(np.float32)  # a copy: the caller's array is never touched
    if not np.isfinite(values).all():
        raise VolscanError(f"{what} contains NaN or infinite values")
    return values


def _mask(mask: ArrayLike, shape: tuple[int, ...], what: str) -> np.ndarray:
    raw = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if raw.shape != shape:
        raise VolscanError(f"{what} has shape {raw.shape}, expected {shape}")
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise VolscanError(f"{what} must be boolean (or 0/1), got dtype {raw.dtype} with other values")
    return raw != 0


def robust_standardize(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(values - median) / IQR over `region` (float32, same shape); 0 outside `region` maps like a 0 value.

    Falls back to the region's standard deviation, then to 1, where the quartiles coincide.
    """
    inside = values[region]
    q25, median, q75 = np.percentile(inside, (25, 50, 75))
    scale = q75 - q25
    if not scale > 0:
        scale = float(inside.std()) or 1.0
    out = np.where(region, values, 0.0).astype(np.float32)
    out -= np.float32(median)
    out /= np.float32(scale)
    return out


def _blocks(array: np.ndarray, patch: int) -> np.ndarray:
    """(g0*p, g1*p, ...) -> (g0, g1, ..., p^d): each cell's values on the last axis."""
    grid = [n // patch for n in array.shape]
    interleaved = array.reshape([v for g in grid for v in (g, patch)])
    d = array.ndim
    moved = interleaved.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return moved.reshape(*grid, patch ** d)


class _CellStats:
    """Masked per-cell statistics of responses over one grid (brain voxels of each cell only)."""

    def __init__(self, region: np.ndarray, patch: int) -> None:
        self.patch = patch
        self.weights = _blocks(region.astype(np.float32), patch)  # (*grid, p^d)
        self.inside = self.weights > 0
        self.count = np.maximum(self.weights.sum(-1), 1.0)

    def mean_std(self, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cells = _blocks(response, self.patch)
        mean = (cells * self.weights).sum(-1) / self.count
        var = ((cells - mean[..., None]) ** 2 * self.weights).sum(-1) / self.count
        return mean, np.sqrt(var)

    def min_max(self, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cells = _blocks(response, self.patch)
        low = np.where(self.inside, cells, np.inf).min(-1)
        high = np.where(self.inside, cells, -np.inf).max(-1)
        empty = ~self.inside.any(-1)  # void cells without a brain voxel: 0, never scored
        return np.where(empty, 0.0, low), np.where(empty, 0.0, high)


def _gradient_magnitude(smooth: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(g * g for g in np.gradient(smooth)), dtype=np.float32)


class ClassicalTokenizer:
    """Volume (S, S, S) or image (H, W) / (H, W, 3) -> `TokenSet` of classical features, no weights.

    `scales`: Gaussian sigmas in voxels (pixels), ascending, the finest goes to layer 0 and the
    rest to layer 1 (one scale: a single layer); `void_fraction`: minimum brain fraction of a
    non-void cell; `patch`: cell edge (14, the ViT grid). Tokens (*grid, D) float32, D per layer
    in `feature_names`; colour images get every feature per channel. Not standardised: see
    `standardize_batch`.
    """

    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES, void_fraction: float = DEFAULT_VOID_FRACTION,
                 patch: int = PATCH) -> None:
        try:
            self.scales = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise VolscanError(f"scales must be a list of positive numbers, got {scales!r}") from None
        if not self.scales or any(not s > 0 for s in self.scales) or list(self.scales) != sorted(set(self.scales)):
            raise VolscanError(f"scales must be distinct positive numbers in ascending order, got {scales!r}")
        numeric = isinstance(void_fraction, (int, float)) and not isinstance(void_fraction, bool)
        if not numeric or not 0 <= void_fraction <= 1:
            raise VolscanError(f"void_fraction must be a number within [0, 1], got {void_fraction!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 2:
            raise VolscanError(f"patch must be an integer >= 2, got {patch!r}")
        self.void_fraction = float(void_fraction)
        self.patch = patch
        self.identity = BackboneIdentity(CLASSICAL_BACKBONE, "none", False)
        self.timing = {"filters_s": 0.0, "stats_s": 0.0, "inputs": 0}

    @property
    def layer_scales(self) -> list[tuple[float, ...]]:
        """The scales of each token layer: the finest, then the rest."""
        return [self.scales[:1], self.scales[1:]] if len(self.scales) > 1 else [self.scales]

    @property
    def feature_names(self) -> list[list[str]]:
        """Per layer, the name of each token channel (one grey channel; colour images repeat them per channel)."""
        names = []
        for i, scales in enumerate(self.layer_scales):
            layer = ["intensity mean", "intensity std"] if i == 0 else []
            for s in scales:
                layer += [f"gauss{s:g} mean", f"gauss{s:g} std"]
                if i == 0:
                    layer += [f"gauss{s:g} min", f"gauss{s:g} max"]
                layer += [f"gradmag{s:g} mean", f"gradmag{s:g} std",
                          f"log{s:g} mean", f"log{s:g} std", f"log{s:g} min", f"log{s:g} max"]
            names.append(layer)
        return names

    def describe(self, kind: str = "3d") -> str:
        """One line saying which features the tokens are, for consoles and reports (`kind` "3d"
        for volumes, "2d" for images)."""
        scales = ", ".join(f"{s:g}" for s in self.scales)
        width = " + ".join(str(len(n)) for n in self.feature_names)
        cell, unit = (f"{self.patch}-pixel patch,", "pixels") if kind == "2d" else \
            (f"{self.patch}-voxel cube, brain-voxel", "voxels")
        return (f"classical features (no neural network, no weights): per {cell} "
                f"mean/std/min/max of robustly standardised intensity, Gaussian smoothing, gradient magnitude and "
                f"Laplacian of Gaussian at sigma {scales} {unit} ({width} channels in {len(self.feature_names)} "
                f"layers), standardised across the batch")

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes the tokens (besides the input), JSON-ready, for cache keys."""
        return {
            "format": TOKEN_FORMAT_VERSION,
            "backbone": CLASSICAL_BACKBONE,
            "scales": list(self.scales),
            "patch": self.patch,
            "void_fraction": self.void_fraction,
            "features": self.feature_names,
            "intensity": "median/IQR",
            "boundary": BOUNDARY,
            "tokenizer": type(self).__name__,
        }

    def _features(self, unit: np.ndarray, stats: _CellStats) -> list[np.ndarray]:
        """Per layer (*grid, D) float32 for one standardised grey channel."""
        layers = []
        for i, scales in enumerate(self.layer_scales):
            columns: list[np.ndarray] = list(stats.mean_std(unit)) if i == 0 else []
            for s in scales:
                t0 = time.perf_counter()
                smooth = ndimage.gaussian_filter(unit, s, mode=BOUNDARY)
                gradient = _gradient_magnitude(smooth)
                log_response = ndimage.laplace(smooth, mode=BOUNDARY) * np.float32(s * s)
                t1 = time.perf_counter()
                columns += stats.mean_std(smooth)
                if i == 0:
                    columns += stats.min_max(smooth)
                columns += stats.mean_std(gradient) + stats.mean_std(log_response) + stats.min_max(log_response)
                self.timing["filters_s"] += t1 - t0
                self.timing["stats_s"] += time.perf_counter() - t1
            layers.append(np.stack(columns, axis=-1).astype(np.float32))
        return layers

    def _tokens(self, channels: list[np.ndarray], region: np.ndarray, meta: dict[str, Any]) -> TokenSet:
        stats = _CellStats(region, self.patch)
        per_channel = [self._features(robust_standardize(c, region), stats) for c in channels]
        layers = [torch.from_numpy(np.concatenate([feats[i] for feats in per_channel], axis=-1))
                  for i in range(len(self.layer_scales))]
        void = void_from_mask(torch.from_numpy(region), self.patch, self.void_fraction)
        self.timing["inputs"] += 1
        meta = dict(self.settings, random_weights=False, **{BATCH_STANDARDIZE: True}, **meta)
        return TokenSet(layers, void, tuple(void.shape), meta)

    def volume_tokens(self, volume: ArrayLike, brain_mask: ArrayLike | None = None) -> TokenSet:
        """Tokens (g, g, g, D) of a cube volume (S, S, S), S a multiple of `patch`; brain = voxels != 0 if no mask."""
        values = _numpy(volume, "volume")
        shape = values.shape
        if values.ndim != 3 or len(set(shape)) != 1:
            raise VolscanError(f"volume must be a cube (S, S, S), got shape {shape}")
        if shape[0] % self.patch:
            raise VolscanError(f"cube edge {shape[0]} is not a positive multiple of the patch size {self.patch}")
        brain = values != 0 if brain_mask is None else _mask(brain_mask, shape, "brain mask")
        if not brain.any():
            raise VolscanError("volume has no brain voxels (empty brain mask, or all zero)")
        return self._tokens([values], brain, {"size": int(shape[0])})

    def image_tokens(self, image: ArrayLike, mask: ArrayLike | None = None) -> TokenSet:
        """Tokens (h, w, D) of an image (H, W) or (H, W, 3), sides multiples of `patch` (colour: D x 3).

        `mask` (H, W) bool marks the object (void where < void_fraction); None = all valid.
        """
        values = _numpy(image, "image")
        if values.ndim == 3 and values.shape[-1] == 1:
            values = values[..., 0]
        if not (values.ndim == 2 or (values.ndim == 3 and values.shape[-1] == 3)):
            raise VolscanError(f"image must be (H, W) or (H, W, 3), got shape {values.shape}")
        size = values.shape[:2]
        if any(n % self.patch for n in size):
            raise VolscanError(f"image sides {size} are not positive multiples of the patch size {self.patch}")
        region = np.ones(size, bool) if mask is None else _mask(mask, size, "image mask")
        if not region.any():
            raise VolscanError("image mask is empty")
        channels = [values] if values.ndim == 2 else [values[..., c] for c in range(3)]
        return self._tokens(channels, region, {"input_size": list(size)})

    def __call__(self, array: ArrayLike, mask: ArrayLike | None = None) -> TokenSet:
        """Tokens of a cube volume (3D, cubic) or an image (2D, or (H, W, 3)); see the two methods."""
        shape = tuple(array.shape)
        is_image = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3) and len(set(shape)) > 1)
        return self.image_tokens(array, mask) if is_image else self.volume_tokens(array, mask)


def needs_batch_standardize(token_sets: Sequence[TokenSet]) -> bool:
    """True when the token sets ask for `standardize_batch` before scoring (classical tokens)."""
    return bool(token_sets) and all(t.meta.get(BATCH_STANDARDIZE, False) for t in token_sets)


def standardize_batch(layers: Sequence[torch.Tensor], valid: torch.Tensor) -> list[torch.Tensor]:
    """Per channel: subtract the mean and divide by the standard deviation over the valid tokens of the
    batch; then append the constant reference pair `+-REFERENCE_SCALE * sqrt(D / 2)` (module docstring).

    `layers`: per layer (N, *grid, D) float tensors; `valid`: (N, *grid) bool. Returns new float32
    tensors (N, *grid, D + 2) (void tokens transformed alike; they are not scored). A channel
    constant over the batch is only centred.
    """
    if not bool(valid.any()):
        raise VolscanError("no valid token in the batch to standardise over")
    out = []
    for layer in layers:
        if tuple(layer.shape[:-1]) != tuple(valid.shape):
            raise VolscanError(f"layer shape {tuple(layer.shape)} does not match valid {tuple(valid.shape)} + (D,)")
        values = layer.float()
        inside = values[valid].double()  # (T, D); float64 sums: T can be 10^5 and channels far from 0
        mean = inside.mean(0)
        std = inside.std(0, unbiased=False)
        std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
        standard = (values - mean.float()) / std.float()
        half = REFERENCE_SCALE * (standard.shape[-1] / 2) ** 0.5
        reference = torch.tensor([half, -half]).expand(*standard.shape[:-1], 2)
        out.append(torch.cat([standard, reference], dim=-1))
    return out


def describe_tokenizer(tokenizer: Any, kind: str = "3d") -> str:
    """One line naming the features a tokenizer makes (classical, or a `volumetric.tokens` ViT tokenizer)."""
    if isinstance(tokenizer, ClassicalTokenizer):
        return tokenizer.describe(kind)
    identity = tokenizer.identity
    weights = "RANDOM weights (scores meaningless)" if identity.random_weights else f"weights {identity.weights}"
    return (f"ViT tokens of {identity.name} ({weights}), blocks {list(tokenizer.layers)}, "
            f"JL projection to {tokenizer.proj_dim} per axis")
