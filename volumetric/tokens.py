"""Element tokens from a frozen 2D ViT: one per p^3 cube of a volume, or one per p^2 patch of an image.

Volume (`VolumeTokenizer`, cube S^3, S a multiple of the patch size p = 14): for each axis the
S slices go through the backbone in batches (grayscale repeated to 3 channels, the backbone's
mean/std); each chosen layer's (S/p, S/p) patch grid, through the backbone's final norm, is
averaged over every block of p consecutive slices (one C-dim feature per p^3 cube), L2-normalised,
projected by one seeded Gaussian JL matrix (C -> r), and the three axes' grids are permuted to the
cube's axis order and concatenated: (g, g, g, 3r), g = S/p, per layer. The volume is permuted,
not the code, so the three axes share one path. Image (`ImageTokenizer`): one pass, its
(H/p, W/p) grid, the same normalisation and projection: (h, w, r) per layer.

`TokenSettings` holds every token setting as one frozen value; `settings.build()` makes the
backbone and the tokenizer. Defaults and why (docs/tokens.md, "Choices and why", with the
measurements): intensities mapped from the brain's 1st..99th percentiles to [0, 1] (a few hot
voxels or a lesion cannot set the scale; `value_range` fixes one map), background 0;
`void_fraction` 0.5 (a cube mostly outside the brain is void, computed but not scored);
`proj_dim` 128; `final_norm` True (as DINOv2's `get_intermediate_layers(norm=True)` in MuSc);
images resized to multiples of p so the grid covers them without a void border.
`precision="auto"` is bf16 where the device multiplies it natively, float32 elsewhere; block
sums accumulate in float32 and the precision is part of every cache key. All-zero slices are
computed once per slice size, not per slice (same tokens). `slices_per_block=K` (off) extracts
K evenly spaced slices per block. `patch=c` (off: c = p) gives c-voxel cubes, c a divisor of p:
each slice upsampled p/c times before the backbone, blocks of c slices (a grid p/c times as fine,
about (p/c)^2 times the work; docs/tokens.md, "A grid twice as fine"). `prepare` (CPU) and
`extract` (device) are separate so a loader (`volumetric.prefetch.prefetch`) can prepare the next
volumes meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from volumetric.backbones import (
    DEFAULT_BACKBONE,
    RANDOM_WEIGHTS_WARNING,
    backbone_identity,
    create_backbone,
    patch_size,
    resolve_layers,
)
from volumetric.choices import PRECISIONS
from volumetric.cache_keys import TOKEN_FORMAT_VERSION
from volumetric.devices import cpu_has_native_bf16, resolve_device
from volumetric.errors import VolscanError
from volumetric.projection import jl_matrix, matrix_fingerprint, normalize_project
from volumetric.token_set import TokenSet

log = logging.getLogger(__name__)

DEFAULT_PROJ_DIM = 128
DEFAULT_VOID_FRACTION = 0.5
DEFAULT_PERCENTILES = (1.0, 99.0)
# Slices per backbone call. CPU: measured in docs/tokens.md (ViT-L bf16, 2 cores); GPU: large
# enough to fill an H100/H200 with ViT-L at 224^2 (benchmarks/tokens.py gpu measures others).
CPU_SLICE_BATCH = 16
GPU_SLICE_BATCH = 128
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ArrayLike = np.ndarray | torch.Tensor


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `precision` on `device` ("auto": bf16 on CUDA (fp16 if the GPU has
    no bf16) and on CPUs with native bf16, else float32); `VolscanError` where impossible."""
    if precision not in PRECISIONS:
        raise VolscanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if precision == "bf16" and not bf16:
            raise VolscanError(f"precision bf16: {device} does not support bfloat16; use fp16 or fp32")
        return _DTYPES[precision]
    if precision == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if precision == "fp16":
        raise VolscanError("precision fp16 is for CUDA devices; on CPU use bf16 or fp32")
    if precision == "bf16" and not cpu_has_native_bf16():
        log.warning("precision bf16 on a CPU without AVX512-BF16/AMX: emulated, likely slower than fp32")
    return _DTYPES[precision]


def slice_upsampling(backbone_patch: int, cube: int | None) -> int:
    """Factor by which each slice is upsampled so that one backbone patch covers `cube` voxels.

    `cube` None (or the backbone's own patch) -> 1, today's grid; 7 with a 14-pixel patch -> 2:
    slices twice as large, a grid twice as fine. Any other edge -> `VolscanError`: a factor that is
    not whole cannot be reached, and a larger one (cube 1 or 2 at patch 14: slices of 3136 or 1568
    pixels, a 224³ or 112³ grid) would run out of memory deep in extraction, unmeasured.
    """
    if cube is None:
        return 1
    if isinstance(cube, bool) or not isinstance(cube, int) or cube not in (backbone_patch, backbone_patch / 2):
        raise VolscanError(f"tokenizer patch {cube!r}: a ViT's cube edge is its {backbone_patch}-pixel patch or "
                           f"half of it ({backbone_patch // 2}: slices upsampled 2x, a grid twice as fine)")
    return backbone_patch // cube


def block_offsets(patch: int, slices_per_block: int | None) -> list[int]:
    """Offsets within a block of `patch` slices of the K evenly spaced slices used (all if None).

    Slice i of K sits at the centre of the i-th of K equal parts of the block: K = 1 -> [7],
    K = 2 -> [3, 10], K = 7 -> [1, 3, ..., 13] for p = 14.
    """
    if slices_per_block is None:
        return list(range(patch))
    k = slices_per_block
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= patch:
        raise VolscanError(f"slices_per_block must be an integer within 1..{patch}, got {k!r}")
    return [(2 * i + 1) * patch // (2 * k) for i in range(k)]


class StageTimer:
    """Seconds spent per stage, and counters. Device stages on CUDA are timed with CUDA events
    (read when `totals()` is called), so timing never makes the host wait for the GPU; host
    stages use the wall clock. Thread-safe (a prefetching loader times `prepare` meanwhile)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far."""
        with self._lock:
            self._seconds: dict[str, float] = {}
            self._counts: dict[str, int] = {}
            self._events: list[tuple[str, Any, Any]] = []

    @contextmanager
    def stage(self, name: str, host: bool = False) -> Iterator[None]:
        """Time the block as stage `name`; `host=True` for CPU-only work on any device."""
        if self.device.type == "cuda" and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        yield
        self._add(name, time.perf_counter() - t0)

    def _add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def count(self, name: str, n: int) -> None:
        """Add `n` to counter `name` (e.g. slices run, slices skipped)."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + int(n)

    def totals(self) -> dict[str, float]:
        """Seconds per stage (`<name>_s`) and the counters; waits for pending CUDA events."""
        with self._lock:
            events, self._events = self._events, []
        for name, start, end in events:
            end.synchronize()
            self._add(name, start.elapsed_time(end) / 1000.0)
        with self._lock:
            return {**{f"{k}_s": v for k, v in self._seconds.items()}, **self._counts}


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


@dataclass(frozen=True)
class PreparedVolume:
    """A cube after the host-side work of `VolumeTokenizer.prepare`: `unit` (S, S, S) float32 in
    [0, 1] (pinned memory when the tokenizer runs on CUDA), `void` (g, g, g) bool."""

    unit: torch.Tensor
    void: torch.Tensor

    @property
    def size(self) -> int:
        """Cube edge S in voxels."""
        return int(self.unit.shape[0])


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
        precision: str,
        final_norm: bool,
        progress: bool,
        percentiles: tuple[float, float],
        value_range: tuple[float, float] | None,
    ) -> None:
        self.backbone = backbone
        self.identity = backbone_identity(backbone)
        self.patch = patch_size(backbone)
        self.upsample = 1  # slices are enlarged this many times before the backbone (VolumeTokenizer's `patch`)
        self.layers = resolve_layers(backbone, layers)
        self.proj_dim = proj_dim
        self.seed = seed
        self.matrix = jl_matrix(int(backbone.embed_dim), proj_dim, seed)
        numeric = isinstance(void_fraction, (int, float)) and not isinstance(void_fraction, bool)
        if not numeric or not 0 <= void_fraction <= 1:
            raise VolscanError(f"void_fraction must be a number within [0, 1], got {void_fraction!r}")
        self.void_fraction = float(void_fraction)
        self.percentiles, self.value_range = check_intensity_map(percentiles, value_range)
        if not isinstance(final_norm, bool):
            raise VolscanError(f"final_norm must be true or false, got {final_norm!r}")
        self.final_norm = final_norm
        if device is not None:
            try:
                self.backbone.to(resolve_device(device))
            except (RuntimeError, TypeError) as exc:
                raise VolscanError(f"cannot use device {device!r}: {exc}") from None
        self.device = next(backbone.parameters()).device
        self.dtype = resolve_precision(precision, self.device)
        default_batch = GPU_SLICE_BATCH if self.device.type == "cuda" else CPU_SLICE_BATCH
        self.slice_batch = default_batch if slice_batch is None else slice_batch
        if isinstance(self.slice_batch, bool) or not isinstance(self.slice_batch, int) or self.slice_batch < 1:
            raise VolscanError(f"slice_batch must be a positive integer, got {slice_batch!r}")
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=self.device).view(1, 3, 1, 1)
        self.progress = progress
        self.timer = StageTimer(self.device)
        self._intermediates: Callable[..., list[torch.Tensor]] = backbone.forward_intermediates
        self._blank: dict[tuple[int, int], list[torch.Tensor]] = {}
        if self.identity.random_weights:
            log.warning("tokenizer uses a backbone with %s", RANDOM_WEIGHTS_WARNING)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes the tokens (besides the input), JSON-ready, for cache keys."""
        return {
            "format": TOKEN_FORMAT_VERSION,
            "backbone": self.identity.name,
            "weights": self.identity.weights,
            "model_kwargs": self.identity.model_kwargs,
            "layers": list(self.layers),
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "projection": matrix_fingerprint(self.matrix),
            "void_fraction": self.void_fraction,
            "precision": str(self.dtype).removeprefix("torch."),
            "final_norm": self.final_norm,
            "intensity": ({"value_range": list(self.value_range)} if self.value_range
                          else {"percentiles": list(self.percentiles)}),
            "tokenizer": type(self).__name__,
        }

    def _meta(self, **extra: Any) -> dict[str, Any]:
        meta = dict(self.settings, random_weights=self.identity.random_weights, patch=self.patch)
        meta.update(extra)
        return meta

    def compile(self, **options: Any) -> None:
        """Run the backbone through `torch.compile(**options)` from now on (same tokens up to
        float rounding; off by default: benchmarks/tokens.py gpu measures whether it pays)."""
        self._intermediates = torch.compile(self.backbone.forward_intermediates, **options)

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(b, H, W) or (b, 3, H, W) images in [0, 1] -> per layer (b, C, uH/p, uW/p) features,
        u = `upsample` (bilinear, per batch, so only one batch of enlarged slices is ever held)."""
        with self.timer.stage("slice"):
            x = images.to(self.device, torch.float32, non_blocking=True)
            if x.ndim == 3:
                x = x[:, None]
            if self.upsample != 1:
                x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            x = x.expand(-1, 3, -1, -1)
            x = (x - self.mean) / self.std
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with self.timer.stage("backbone"), autocast:
            # stop_early: blocks after the last chosen layer cannot change it (ViT-L [11, 17]: 18 of 24 run)
            feats = self._intermediates(x, indices=self.layers, intermediates_only=True, norm=self.final_norm,
                                        stop_early=True, output_fmt="NCHW")
        self.timer.count("slices", x.shape[0])
        return feats

    def blank_features(self, height: int, width: int) -> list[torch.Tensor]:
        """Per layer (C, uH/p, uW/p) float32 features of an all-zero image, computed once per size."""
        if (height, width) not in self._blank:
            zeros = torch.zeros(1, height, width)
            self._blank[height, width] = [f[0].float() for f in self._forward(zeros)]
        return self._blank[height, width]

    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, groups: torch.Tensor, n_groups: int, bar: tqdm | None = None
    ) -> list[torch.Tensor]:
        """Backbone patch features of images in [0, 1], summed per group.

        `images`: (n, H, W) grayscale or (n, 3, H, W), uH and uW multiples of the patch size
        (u = `upsample`); `groups`: (n,) int, the group of each image (< n_groups). Images that
        are all zero are not run: the features of one blank image stand in for each. Returns per
        layer a float32 tensor (n_groups, C, uH/p, uW/p) of feature sums on the tokenizer's device.
        """
        height, width = images.shape[-2:]
        grid = (height * self.upsample // self.patch, width * self.upsample // self.patch)
        sums = [torch.zeros(n_groups, int(self.backbone.embed_dim), *grid, device=self.device)
                for _ in self.layers]
        groups = groups.to(self.device)
        blank = ~images.reshape(images.shape[0], -1).any(dim=1).to(self.device)
        if blank.any():
            per_group = torch.bincount(groups[blank], minlength=n_groups).float()
            for acc, feat in zip(sums, self.blank_features(height, width)):
                acc.add_(per_group.view(-1, 1, 1, 1) * feat)
            self.timer.count("skipped_slices", int(blank.sum()))
        run = torch.nonzero(~blank).flatten()
        for start in range(0, len(run), self.slice_batch):
            index = run[start:start + self.slice_batch]
            feats = self._forward(images[index.to(images.device)])
            with self.timer.stage("pool"):
                for acc, feat in zip(sums, feats):
                    acc.index_add_(0, groups[index], feat.float())
            if bar is not None:
                bar.update(len(index))
        if bar is not None:
            bar.update(int(blank.sum()))
        return sums

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C) backbone features -> (..., r) float32: L2-normalise, then the JL projection."""
        with self.timer.stage("project"):
            return normalize_project(features, self.matrix)


class VolumeTokenizer(_Tokenizer):
    """Cube volume (S, S, S) -> `TokenSet` with per layer (g, g, g, 3r) tokens, g = S / c, c the
    cube edge (`patch`; the backbone's patch size p by default).

    `layers`: block indices (None = `backbones.default_layers`); `proj_dim`: r; `seed`: the JL
    matrix; `slice_batch`: slices per backbone call (None = 16 on CPU, 128 on GPU);
    `void_fraction`: minimum brain fraction of a non-void cube; `device`: moves the backbone
    there (None = where it is); `percentiles` / `value_range`: the [0, 1] intensity map;
    `precision`: "auto" | "fp32" | "bf16" | "fp16" (see `resolve_precision`);
    `slices_per_block`: K evenly spaced slices per block (None = all c); `final_norm`: pass
    intermediate tokens through the backbone's final norm; `progress`: a tqdm bar over the 3 S slices;
    `patch`: the cube edge c in voxels, a divisor of p (None = p): every slice is upsampled p/c
    times (bilinear) so that one backbone patch covers c x c voxels, and blocks hold c slices
    (7 with DINOv2's 14: slices of 448 at 224^3, a 32^3 grid, docs/tokens.md).
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
        precision: str = "auto",
        slices_per_block: int | None = None,
        final_norm: bool = True,
        progress: bool = True,
        patch: int | None = None,
    ) -> None:
        super().__init__(backbone, layers, proj_dim, seed, slice_batch, void_fraction, device, precision,
                         final_norm, progress, percentiles, value_range)
        self.upsample = slice_upsampling(self.patch, patch)
        self.cube = self.patch // self.upsample
        self.slices_per_block = slices_per_block
        self.offsets = torch.tensor(block_offsets(self.cube, slices_per_block))

    @property
    def settings(self) -> dict[str, Any]:
        """As `_Tokenizer.settings`, plus the slices used per block (None = all) and, for a cube
        edge other than the backbone's patch, `patch` (absent otherwise: earlier keys unchanged)."""
        settings = dict(super().settings, slices_per_block=self.slices_per_block)
        if self.upsample != 1:
            settings["patch"] = self.cube
        return settings

    def prepare(self, volume: ArrayLike, brain_mask: ArrayLike | None = None) -> PreparedVolume:
        """Host-side work for one cube (checks, [0, 1] map, void grid); safe to run in another
        thread while `extract` runs. Brain = voxels != 0 when no mask is given."""
        with self.timer.stage("prepare", host=True):
            values = _as_float_tensor(volume, "volume")
            shape = tuple(values.shape)
            if values.ndim != 3 or len(set(shape)) != 1:
                raise VolscanError(f"volume must be a cube (S, S, S), got shape {shape}")
            if shape[0] % self.cube or shape[0] < self.cube:
                raise VolscanError(f"cube edge {shape[0]} is not a positive multiple of the patch size {self.cube}")
            brain = values != 0 if brain_mask is None else _as_mask(brain_mask, shape, "brain mask")
            if not brain.any():
                raise VolscanError("volume has no brain voxels (empty brain mask, or all zero)")
            unit = unit_intensities(values, brain, self.percentiles, self.value_range)
            if self.device.type == "cuda":
                unit = unit.pin_memory()
            return PreparedVolume(unit, void_from_mask(brain, self.cube, self.void_fraction))

    def pooled(self, unit_volume: torch.Tensor) -> list[torch.Tensor]:
        """Per layer (3, g, g, g, C): block-averaged backbone features of each axis's slices.

        `unit_volume` (S, S, S) in [0, 1]. Index 0 of the result is the axis the slices were
        taken along; the grid axes are the cube's own, whichever axis was sliced.
        """
        size = unit_volume.shape[0]
        blocks = size // self.cube
        # the slices used: offsets within each block, and the block each belongs to
        chosen = (torch.arange(blocks)[:, None] * self.cube + self.offsets[None]).flatten()
        groups = chosen // self.cube
        unit_volume = unit_volume.to(self.device, non_blocking=True)
        per_axis: list[list[torch.Tensor]] = []
        with tqdm(total=3 * len(chosen), unit="slice", desc="tokens", leave=False, disable=not self.progress) as bar:
            for axis in range(3):
                slices = unit_volume.movedim(axis, 0)[chosen.to(self.device)]
                sums = self.encode(slices, groups, blocks, bar=bar)
                # (g_axis, C, g_b, g_c) -> (g_axis, g_b, g_c, C) -> the sliced axis back to its place
                per_axis.append([(acc / len(self.offsets)).movedim(1, -1).movedim(0, axis) for acc in sums])
        return [torch.stack([axis_feats[i] for axis_feats in per_axis]) for i in range(len(self.layers))]

    def extract(self, prepared: PreparedVolume) -> TokenSet:
        """Tokens of a prepared cube (the device work)."""
        layers = []
        for feats in self.pooled(prepared.unit):
            projected = self.project(feats)  # (3, g, g, g, r)
            layers.append(torch.cat(list(projected), dim=-1).cpu())
        meta = self._meta(size=prepared.size, patch=self.cube)
        return TokenSet(layers, prepared.void, tuple(prepared.void.shape), meta)

    def __call__(self, volume: ArrayLike, brain_mask: ArrayLike | None = None) -> TokenSet:
        """Tokens of a cube volume (S, S, S), arbitrary intensities; brain = voxels != 0 if no mask."""
        return self.extract(self.prepare(volume, brain_mask))


class ImageTokenizer(_Tokenizer):
    """Image (H, W) or (H, W, 3) -> `TokenSet` with per layer (h, w, r) tokens, h = H/p, w = W/p.

    Same settings as `VolumeTokenizer` (no slices); sides that are not multiples of p are
    resized to the nearest multiple first (recorded in `meta`).
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
        precision: str = "auto",
        final_norm: bool = True,
    ) -> None:
        super().__init__(backbone, layers, proj_dim, seed, None, void_fraction, device, precision, final_norm,
                         False, percentiles, value_range)

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
        # one image in one group: per layer (1, C, h, w) -> (h, w, C) -> (h, w, r)
        encoded = self.encode(unit[None], torch.zeros(1, dtype=torch.long), 1)
        layers = [self.project(feat[0].movedim(0, -1)).cpu() for feat in encoded]
        grid = tuple(layers[0].shape[:2])
        if mask is None:
            void = torch.zeros(grid, dtype=torch.bool)
        else:
            region = _as_mask(mask, size, "image mask").float()
            region = F.interpolate(region[None, None], size=target, mode="nearest")[0, 0] > 0.5
            void = void_from_mask(region, self.patch, self.void_fraction)
        return TokenSet(layers, void, grid, self._meta(input_size=list(size), resized_to=list(target)))


@dataclass(frozen=True)
class TokenSettings:
    """Every setting of token extraction, passed whole (CLI flags and config files map onto it).

    `backbone`, `weights` (None = hub, a path, or "random"), `backbone_kwargs` (timm options)
    choose the model; the rest are the `VolumeTokenizer` / `ImageTokenizer` arguments of the
    same names (`seed` also seeds random weights). `device`: "auto", "cpu", "cuda", "cuda:N".
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None
    proj_dim: int = DEFAULT_PROJ_DIM
    seed: int = 0
    void_fraction: float = DEFAULT_VOID_FRACTION
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    value_range: tuple[float, float] | None = None
    precision: str = "auto"
    slices_per_block: int | None = None
    final_norm: bool = True
    slice_batch: int | None = None
    device: str = "auto"
    patch: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise VolscanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        k = self.slices_per_block
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise VolscanError(f"slices_per_block must be a positive integer (at most the patch size), got {k!r}")
        c = self.patch
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise VolscanError(f"tokenizer patch must be a positive integer (a cube edge in voxels), got {c!r}")

    def build(self, kind: str = "3d", model: nn.Module | None = None) -> VolumeTokenizer | ImageTokenizer:
        """The backbone (on `device`) and its tokenizer for volumes ("3d") or images ("2d");
        `model`: the backbone already built from these settings (e.g. by `volscan screen`'s
        validation pass, which loads the weights before any work), else built here."""
        if kind not in ("3d", "2d"):
            raise VolscanError(f"kind must be '3d' or '2d', got {kind!r}")
        if model is None:
            device = resolve_device(self.device)
            model = create_backbone(self.backbone, self.weights, device, random_seed=self.seed,
                                    **self.backbone_kwargs)
        layers = None if self.layers is None else list(self.layers)
        common = dict(layers=layers, proj_dim=self.proj_dim, seed=self.seed, void_fraction=self.void_fraction,
                      percentiles=self.percentiles, value_range=self.value_range, precision=self.precision,
                      final_norm=self.final_norm)
        if kind == "2d":
            if self.patch is not None:
                raise VolscanError("tokenizer patch (a finer cube grid) applies to 3D volumes only; "
                                   "remove it for 2D images")
            return ImageTokenizer(model, **common)
        return VolumeTokenizer(model, slice_batch=self.slice_batch, slices_per_block=self.slices_per_block,
                               patch=self.patch, **common)
