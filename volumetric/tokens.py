"""Element tokens from a frozen 2D ViT: one per p^3 cube of a volume, or one per p^2 patch of an image.

Volume (`VolumeTokenizer`, cube S^3, S a multiple of the patch size p = 14):
for each axis, all S slices go through the backbone in batches (grayscale repeated to 3
channels, the backbone's own mean/std); each chosen layer's (S/p, S/p) patch grid is averaged
over every block of p consecutive slices, giving one C-dim feature per p^3 cube; the features are
L2-normalised, projected by one Gaussian JL matrix (C -> r, fixed by `seed`), the three grids
are permuted to the cube's own axis order and concatenated: (g, g, g, 3r), g = S/p, per layer.
The three axes share one code path (the volume is permuted, not the code).

Image (`ImageTokenizer`): one pass, its (H/p, W/p) grid, the same normalisation and projection:
(h, w, r) per layer, so the engine sees the same kind of input.

Choices the method leaves open (all exposed as parameters):
- Intensities -> [0, 1]: inputs are Nyul-standardised but on an arbitrary scale, so each volume
  is mapped linearly from its brain voxels' 1st..99th percentiles to [0, 1] and clipped,
  background (outside the brain mask) set to 0, as the skull-stripped slices the backbone
  should see. Percentiles rather than min/max so a few hot voxels cannot compress the tissue
  contrast; 1 % tails are far smaller than the tissue classes yet larger than typical lesion
  volumes' share of the brain, so a lesion does not set the scale (where the two percentiles
  coincide, in nearly uniform phantoms, the brain's min..max is used). `value_range=(lo, hi)`
  replaces this with one fixed map for cohorts whose standard scale is known.
  Images: uint8 /255, floats already within [0, 1] kept, anything else percentile-mapped.
- `void_fraction = 0.5`: a cube is void when less than half its voxels are brain ("mostly
  outside the brain" in the method); void tokens are still computed but left out of scoring.
- `proj_dim = 128` (tokens of width 3r = 384): see docs/tokens.md for the measurement of
  nearest-collection distance distortion versus r; 128 keeps the median relative error of
  d(x, J) at 2.8 % (p95 7 %; r = 64: 3.7 %, p95 11 %) while the engine's N^2 M^2 distance
  cost stays 8x below the 3 x 1024 raw ViT-L width. Raptor (a related embedding) uses 100.
- Images whose sides are not multiples of p are resized (bilinear, antialiased) to the nearest
  multiple (at least p): the grid then covers the whole image, with no padded void border.
- Speed: `torch.inference_mode`, batches of slices (`slice_batch`, 16 on CPU, 128 on GPU) and
  bf16 autocast on GPU (fp16 where bf16 is unsupported); block means accumulate in float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from volumetric.backbones import RANDOM_WEIGHTS_WARNING, backbone_identity, patch_size, resolve_layers
from volumetric.errors import VolscanError
from volumetric.projection import jl_matrix, matrix_fingerprint, normalize_project
from volumetric.token_set import TOKEN_FORMAT_VERSION, TokenSet

log = logging.getLogger(__name__)

DEFAULT_PROJ_DIM = 128
DEFAULT_VOID_FRACTION = 0.5
DEFAULT_PERCENTILES = (1.0, 99.0)
CPU_SLICE_BATCH = 16
GPU_SLICE_BATCH = 128

ArrayLike = np.ndarray | torch.Tensor


def _numpy(array: ArrayLike) -> np.ndarray:
    if not isinstance(array, torch.Tensor):
        return np.asarray(array)
    array = array.detach().cpu()
    return array.float().numpy() if array.dtype in (torch.bfloat16, torch.float16) else array.numpy()


def _as_float_tensor(array: ArrayLike, what: str) -> torch.Tensor:
    """A float32 CPU copy (native byte order), so the caller's array is never touched."""
    raw = _numpy(array)
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise VolscanError(f"{what} must be real-valued numbers, got dtype {raw.dtype}")
    tensor = torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))
    if not torch.isfinite(tensor).all():
        raise VolscanError(f"{what} contains NaN or infinite values")
    return tensor


def _as_mask(mask: ArrayLike, shape: tuple[int, ...], what: str) -> torch.Tensor:
    raw = _numpy(mask)
    if raw.shape != shape:
        raise VolscanError(f"{what} has shape {raw.shape}, expected {shape}")
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise VolscanError(f"{what} must be boolean (or 0/1), got dtype {raw.dtype} with other values")
    return torch.from_numpy(raw != 0)


def check_intensity_map(
    percentiles: tuple[float, float], value_range: tuple[float, float] | None
) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """Validated (percentiles, value_range) as float pairs; `VolscanError` on a bad one."""
    try:
        p_lo, p_hi = (float(p) for p in percentiles)
        fixed = None if value_range is None else tuple(float(v) for v in value_range)
    except (TypeError, ValueError):
        raise VolscanError(
            f"percentiles and value_range must be pairs of numbers, got {percentiles!r} and {value_range!r}") from None
    if not 0 <= p_lo < p_hi <= 100:
        raise VolscanError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if fixed is not None and (len(fixed) != 2 or not fixed[1] > fixed[0]):
        raise VolscanError(f"value_range must be (low, high) with high > low, got {value_range}")
    return (p_lo, p_hi), fixed


def unit_intensities(
    values: torch.Tensor,
    region: torch.Tensor,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Map intensities linearly to [0, 1] (clipped); 0 outside `region`.

    `values` (any shape) float32, `region` bool of the same shape. The map sends the region's
    `percentiles` (or the fixed `value_range`) to 0 and 1. Where the percentiles coincide (a
    nearly uniform region, e.g. a phantom) the region's min..max is used; a constant region maps to 1.
    """
    percentiles, value_range = check_intensity_map(percentiles, value_range)
    if value_range is not None:
        lo, hi = value_range
    else:
        inside = values[region].numpy()
        lo, hi = np.percentile(inside, percentiles).tolist()
        if not hi > lo:
            lo, hi = float(inside.min()), float(inside.max())
    if hi > lo:
        unit = ((values - lo) / (hi - lo)).clamp_(0.0, 1.0)
    else:
        unit = torch.ones_like(values)
    return unit.masked_fill_(~region, 0.0)


def void_from_mask(mask: torch.Tensor, patch: int, void_fraction: float) -> torch.Tensor:
    """(*grid) bool: True where less than `void_fraction` of a patch^d cell of `mask` (2D/3D) is set."""
    pool = F.avg_pool3d if mask.ndim == 3 else F.avg_pool2d
    fraction = pool(mask[None, None].float(), kernel_size=patch)[0, 0]
    return fraction < void_fraction


class _Tokenizer:
    """Backbone, layers, projection and the batched slice encoder shared by 2D and 3D."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int] | None,
        proj_dim: int,
        seed: int,
        slice_batch: int | None,
        void_fraction: float,
        device: str | torch.device | None,
        amp: bool | None,
        progress: bool,
        percentiles: tuple[float, float],
        value_range: tuple[float, float] | None,
    ) -> None:
        self.backbone = backbone
        self.identity = backbone_identity(backbone)
        self.patch = patch_size(backbone)
        self.layers = resolve_layers(backbone, layers)
        self.proj_dim = proj_dim
        self.seed = seed
        self.matrix = jl_matrix(int(backbone.embed_dim), proj_dim, seed)
        numeric = isinstance(void_fraction, (int, float)) and not isinstance(void_fraction, bool)
        if not numeric or not 0 <= void_fraction <= 1:
            raise VolscanError(f"void_fraction must be a number within [0, 1], got {void_fraction!r}")
        self.void_fraction = float(void_fraction)
        self.percentiles, self.value_range = check_intensity_map(percentiles, value_range)
        if device is not None:
            try:
                self.backbone.to(device)
            except (RuntimeError, TypeError) as exc:
                raise VolscanError(f"cannot use device {device!r}: {exc}") from None
        self.device = next(backbone.parameters()).device
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        if self.amp and self.device.type != "cuda":
            raise VolscanError("amp (autocast) is only supported on a CUDA device here")
        if self.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp_dtype = torch.float32
        default_batch = GPU_SLICE_BATCH if self.device.type == "cuda" else CPU_SLICE_BATCH
        self.slice_batch = default_batch if slice_batch is None else slice_batch
        if isinstance(self.slice_batch, bool) or not isinstance(self.slice_batch, int) or self.slice_batch < 1:
            raise VolscanError(f"slice_batch must be a positive integer, got {slice_batch!r}")
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=self.device).view(1, 3, 1, 1)
        self.progress = progress
        self.timing = {"backbone_s": 0.0, "pool_s": 0.0, "project_s": 0.0, "slices": 0}
        if self.identity.random_weights:
            log.warning("tokenizer uses a backbone with %s", RANDOM_WEIGHTS_WARNING)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes the tokens (besides the input), JSON-ready, for cache keys."""
        return {
            "format": TOKEN_FORMAT_VERSION,
            "backbone": self.identity.name,
            "weights": self.identity.weights,
            "layers": list(self.layers),
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "projection": matrix_fingerprint(self.matrix),
            "void_fraction": self.void_fraction,
            "precision": str(self.amp_dtype).removeprefix("torch."),
            "intensity": ({"value_range": list(self.value_range)} if self.value_range
                          else {"percentiles": list(self.percentiles)}),
            "tokenizer": type(self).__name__,
        }

    def _meta(self, **extra: Any) -> dict[str, Any]:
        meta = dict(self.settings, random_weights=self.identity.random_weights, patch=self.patch)
        meta.update(extra)
        return meta

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, block: int = 1, bar: tqdm | None = None) -> list[torch.Tensor]:
        """Backbone patch features of n images in [0, 1], averaged over blocks of `block` consecutive images.

        `images`: (n, H, W) grayscale or (n, 3, H, W), H and W multiples of the patch size,
        n a multiple of `block`. Returns per layer a float32 tensor (n / block, C, H/p, W/p)
        on the tokenizer's device.
        """
        n, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        grid = (height // self.patch, width // self.patch)
        sums = [torch.zeros(n // block, int(self.backbone.embed_dim), *grid, device=self.device)
                for _ in self.layers]
        for start in range(0, n, self.slice_batch):
            t0 = self._clock()
            x = images[start:start + self.slice_batch].to(self.device, torch.float32)
            if x.ndim == 3:
                x = x[:, None].expand(-1, 3, -1, -1)
            x = (x - self.mean) / self.std
            with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext():
                feats = self.backbone.forward_intermediates(
                    x, indices=self.layers, intermediates_only=True, norm=False, output_fmt="NCHW")
            t1 = self._clock()
            blocks = torch.arange(start, start + x.shape[0], device=self.device) // block
            for acc, feat in zip(sums, feats):
                acc.index_add_(0, blocks, feat.float())
            t2 = self._clock()
            self.timing["backbone_s"] += t1 - t0
            self.timing["pool_s"] += t2 - t1
            self.timing["slices"] += x.shape[0]
            if bar is not None:
                bar.update(x.shape[0])
        return [acc / block for acc in sums]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C) backbone features -> (..., r) float32: L2-normalise, then the JL projection."""
        t0 = self._clock()
        out = normalize_project(features, self.matrix)
        self.timing["project_s"] += self._clock() - t0
        return out


class VolumeTokenizer(_Tokenizer):
    """Cube volume (S, S, S) -> `TokenSet` with per layer (g, g, g, 3r) tokens, g = S / p.

    `layers`: block indices (None = `backbones.default_layers`); `proj_dim`: r; `seed`: the JL
    matrix; `slice_batch`: slices per backbone call (None = 16 on CPU, 128 on GPU);
    `void_fraction`: minimum brain fraction of a non-void cube; `device`: moves the backbone
    there (None = where it is); `percentiles` / `value_range`: the [0, 1] intensity map;
    `amp`: autocast (None = on for CUDA); `progress`: a tqdm bar over the 3 S slices.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int] | None = None,
        proj_dim: int = DEFAULT_PROJ_DIM,
        seed: int = 0,
        slice_batch: int | None = None,
        void_fraction: float = DEFAULT_VOID_FRACTION,
        device: str | torch.device | None = None,
        *,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        value_range: tuple[float, float] | None = None,
        amp: bool | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(backbone, layers, proj_dim, seed, slice_batch, void_fraction, device, amp, progress,
                         percentiles, value_range)

    def _check(self, volume: ArrayLike, brain_mask: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor]:
        values = _as_float_tensor(volume, "volume")
        shape = tuple(values.shape)
        if values.ndim != 3 or len(set(shape)) != 1:
            raise VolscanError(f"volume must be a cube (S, S, S), got shape {shape}")
        if shape[0] % self.patch or shape[0] < self.patch:
            raise VolscanError(f"cube edge {shape[0]} is not a positive multiple of the patch size {self.patch}")
        brain = values != 0 if brain_mask is None else _as_mask(brain_mask, shape, "brain mask")
        if not brain.any():
            raise VolscanError("volume has no brain voxels (empty brain mask, or all zero)")
        return values, brain

    def pooled(self, unit_volume: torch.Tensor) -> list[torch.Tensor]:
        """Per layer (3, g, g, g, C): block-averaged backbone features of each axis's slices.

        `unit_volume` (S, S, S) in [0, 1]. Index 0 of the result is the axis the slices were
        taken along; the grid axes are the cube's own, whichever axis was sliced.
        """
        size = unit_volume.shape[0]
        per_axis: list[list[torch.Tensor]] = []
        with tqdm(total=3 * size, unit="slice", desc="tokens", leave=False, disable=not self.progress) as bar:
            for axis in range(3):
                encoded = self.encode(unit_volume.movedim(axis, 0), block=self.patch, bar=bar)
                # (g_axis, C, g_b, g_c) -> (g_axis, g_b, g_c, C) -> the sliced axis back to its place
                per_axis.append([feat.movedim(1, -1).movedim(0, axis) for feat in encoded])
        return [torch.stack([axis_feats[i] for axis_feats in per_axis]) for i in range(len(self.layers))]

    def __call__(self, volume: ArrayLike, brain_mask: ArrayLike | None = None) -> TokenSet:
        """Tokens of a cube volume (S, S, S), arbitrary intensities; brain = voxels != 0 if no mask."""
        values, brain = self._check(volume, brain_mask)
        unit = unit_intensities(values, brain, self.percentiles, self.value_range).to(self.device)
        layers = []
        for feats in self.pooled(unit):
            projected = self.project(feats)  # (3, g, g, g, r)
            layers.append(torch.cat(list(projected), dim=-1).cpu())
        void = void_from_mask(brain, self.patch, self.void_fraction)
        grid = tuple(void.shape)
        return TokenSet(layers, void, grid, self._meta(size=int(values.shape[0])))


class ImageTokenizer(_Tokenizer):
    """Image (H, W) or (H, W, 3) -> `TokenSet` with per layer (h, w, r) tokens, h = H/p, w = W/p.

    Same settings as `VolumeTokenizer`; sides that are not multiples of p are resized to the
    nearest multiple first (recorded in `meta`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int] | None = None,
        proj_dim: int = DEFAULT_PROJ_DIM,
        seed: int = 0,
        void_fraction: float = DEFAULT_VOID_FRACTION,
        device: str | torch.device | None = None,
        *,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        value_range: tuple[float, float] | None = None,
        amp: bool | None = None,
    ) -> None:
        super().__init__(backbone, layers, proj_dim, seed, None, void_fraction, device, amp, False,
                         percentiles, value_range)

    def _unit_image(self, image: ArrayLike) -> torch.Tensor:
        """(H, W) or (3, H, W) float32 in [0, 1]."""
        raw = _numpy(image)
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if not (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[-1] == 3)):
            raise VolscanError(f"image must be (H, W) or (H, W, 3), got shape {raw.shape}")
        values = _as_float_tensor(raw, "image")
        if self.value_range is None and raw.dtype == np.uint8:
            unit = values / 255.0
        elif self.value_range is None and values.min() >= 0 and values.max() <= 1:
            unit = values
        else:
            everywhere = torch.ones_like(values, dtype=torch.bool)
            unit = unit_intensities(values, everywhere, self.percentiles, self.value_range)
        return unit if unit.ndim == 2 else unit.permute(2, 0, 1)

    def __call__(self, image: ArrayLike, mask: ArrayLike | None = None) -> TokenSet:
        """Tokens of one image; `mask` (H, W) bool marks the object (void where < void_fraction)."""
        unit = self._unit_image(image)
        size = tuple(unit.shape[-2:])
        target = tuple(max(self.patch, round(s / self.patch) * self.patch) for s in size)
        if target != size:
            log.info("resizing image %s -> %s (multiples of the patch size %d)", size, target, self.patch)
            batch = unit.reshape(1, -1, *size)
            unit = F.interpolate(batch, size=target, mode="bilinear", antialias=True,
                                 align_corners=False).clamp_(0.0, 1.0).reshape(*unit.shape[:-2], *target)
        # one image, block of 1: per layer (1, C, h, w) -> (h, w, C) -> (h, w, r)
        layers = [self.project(feat[0].movedim(0, -1)).cpu() for feat in self.encode(unit[None])]
        grid = tuple(layers[0].shape[:2])
        if mask is None:
            void = torch.zeros(grid, dtype=torch.bool)
        else:
            region = _as_mask(mask, size, "image mask").float()
            region = F.interpolate(region[None, None], size=target, mode="nearest")[0, 0] > 0.5
            void = void_from_mask(region, self.patch, self.void_fraction)
        return TokenSet(layers, void, grid, self._meta(input_size=list(size), resized_to=list(target)))
