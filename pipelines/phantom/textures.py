"""Synthetic 2D texture cohorts with planted defects (the 2D benchmark family).

One cohort is one *category* (as an MVTec AD / VisA category): `n_normal` defect-free images
and `n_defect` images with one planted defect each, all of one texture kind, with the nuisance
variation real inspection images have, and a mask per image (the defect's pixels).

Texture kinds (RGB in [0, 1], `size` x `size`, default 112: an 8 x 8 token grid):
- `noise`: a Gaussian-filtered noise field (sigma 2.5 px) over a tinted base, as fabric or
  carpet at a distance;
- `grating`: a sinusoidal grating (period 12 px, random phase) with fine noise, as woven or
  machined surfaces;
- `cells`: bright round cells (radius 5-7 px) on a dark background at random positions, as
  tissue or granular material.
Normal variation: every image has its own realisation (noise, phase, cell positions), gain
0.85-1.15, a linear illumination ramp of up to +-8 %, tint jitter of 3 %, orientation jitter of
5 degrees (grating); a fifth of the normal and defect images are a *variant* (noise 1.3 x
coarser, grating period 10 % longer, cells 15 % denser), a second normal mode of the category.

Defects (one per defect image, kinds in turn; the mask is the pixels it changed):
- `scratch`: a straight line 25-45 % of the side long, 2 px wide, brighter or darker by
  `strength` x 0.35;
- `spot`: an elliptic blot of radius 5-9 px, its intensity moved by `strength` x 0.3;
- `colour`: an elliptic patch of radius 10-16 px whose red and blue channels shift by
  `strength` x +-0.12 (the grey level barely moves: a colour-only anomaly).
The defaults (`strength` 1) are chosen so that defects are visible to a person at full size but
none is as easy as a saturated square; what the benchmark reports is relative (methods on one
family), not the family's absolute difficulty.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import ellipse, line

from volumetric.atomic_files import atomic_path
from volumetric.errors import VolscanError

TEXTURE_KINDS = ("noise", "grating", "cells")
DEFECT_KINDS = ("scratch", "spot", "colour")
VARIANT_SHARE = 0.2
# Base colours per kind (RGB): only the tint, the texture carries the structure.
_TINTS = {"noise": (0.55, 0.45, 0.35), "grating": (0.5, 0.5, 0.55), "cells": (0.75, 0.45, 0.6)}


@dataclass(frozen=True)
class TextureSettings:
    """One cohort: `kind` in TEXTURE_KINDS, image counts, side `size` (px), `strength` of the
    defects (1 = the module's defaults), `seed`."""

    kind: str = "noise"
    n_normal: int = 30
    n_defect: int = 10
    size: int = 112
    strength: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TEXTURE_KINDS:
            raise VolscanError(f"texture kind must be one of {TEXTURE_KINDS}, got {self.kind!r}")
        if self.n_normal < 1 or self.n_defect < 0 or self.size < 28:
            raise VolscanError(f"texture cohort needs n_normal >= 1, n_defect >= 0, size >= 28; got {self}")
        if not self.strength > 0:
            raise VolscanError(f"defect strength must be > 0, got {self.strength}")


@dataclass(frozen=True)
class TextureCohort:
    """`ids` (N,), `images` (N, S, S, 3) float32 in [0, 1], `masks` (N, S, S) bool, `defects`
    (N,) the defect kind or "" for normal images, `variant` (N,) bool: the variant mode."""

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    defects: list[str]
    variant: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """(N,) bool: the image carries a defect."""
        return self.masks.reshape(len(self.ids), -1).any(axis=1)


def _texture(kind: str, variant: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) grey structure in about [0, 1] of one normal image."""
    if kind == "noise":
        field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.25 if variant else 2.5)
        return 0.5 + 0.18 * field / field.std()
    if kind == "grating":
        rows, cols = np.mgrid[:size, :size].astype(np.float64)
        angle = np.deg2rad(rng.uniform(-5, 5))
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / (13.2 if variant else 12.0) + phase)
        return 0.5 + 0.25 * wave + 0.04 * rng.normal(size=(size, size))
    # cells: random centres, each pixel lit by its nearest centre's round profile
    count = int(size * size / 230 * (1.15 if variant else 1.0))
    seeds = np.zeros((size, size), dtype=bool)
    seeds[rng.integers(0, size, count), rng.integers(0, size, count)] = True
    distance = ndimage.distance_transform_edt(~seeds)
    radius = rng.uniform(5.0, 7.0)
    return 0.2 + 0.6 * np.exp(-((distance / radius) ** 2)) + 0.03 * rng.normal(size=(size, size))


def _colour(grey: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Tint, gain and illumination ramp: (S, S) grey -> (S, S, 3)."""
    size = grey.shape[0]
    tint = np.array(_TINTS[kind]) * (1 + rng.uniform(-0.03, 0.03, 3))
    rows, cols = np.mgrid[:size, :size] / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 1 + rng.uniform(-0.08, 0.08) * 2 * (rows * np.cos(angle) + cols * np.sin(angle))
    gain = rng.uniform(0.85, 1.15)
    return grey[..., None] * (2 * tint) * gain * ramp[..., None]


def _plant(image: np.ndarray, defect: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Plant one defect in `image` (S, S, 3) in place; returns its mask (S, S) bool."""
    size = image.shape[0]
    mask = np.zeros((size, size), dtype=bool)
    margin = size // 8
    r0, c0 = rng.integers(margin, size - margin, 2)
    sign = rng.choice([-1.0, 1.0])
    if defect == "scratch":
        length = rng.uniform(0.25, 0.45) * size
        angle = rng.uniform(0, np.pi)
        r1 = int(np.clip(r0 + length * np.sin(angle), 0, size - 1))
        c1 = int(np.clip(c0 + length * np.cos(angle), 0, size - 1))
        rr, cc = line(int(r0), int(c0), r1, c1)
        mask[rr, cc] = True
        mask = ndimage.binary_dilation(mask, np.ones((2, 2), dtype=bool))
        image[mask] += sign * 0.35 * strength
    elif defect == "spot":
        rr, cc = ellipse(r0, c0, rng.uniform(5, 9), rng.uniform(5, 9), shape=mask.shape,
                         rotation=rng.uniform(0, np.pi))
        mask[rr, cc] = True
        image[mask] += sign * 0.3 * strength
    else:  # colour: red and blue move apart, green (and so the grey level) about stays
        rr, cc = ellipse(r0, c0, rng.uniform(10, 16), rng.uniform(10, 16), shape=mask.shape,
                         rotation=rng.uniform(0, np.pi))
        mask[rr, cc] = True
        image[mask, 0] += sign * 0.12 * strength
        image[mask, 2] -= sign * 0.12 * strength
    return mask


def texture_cohort(settings: TextureSettings) -> TextureCohort:
    """The images, masks and facts of one cohort (deterministic for one `settings`)."""
    rng = np.random.default_rng([settings.seed, TEXTURE_KINDS.index(settings.kind)])
    n = settings.n_normal + settings.n_defect
    size = settings.size
    images = np.empty((n, size, size, 3), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    variant = np.zeros(n, dtype=bool)
    for group, count in ((0, settings.n_normal), (settings.n_normal, settings.n_defect)):
        variant[group + rng.permutation(count)[: round(VARIANT_SHARE * count)]] = True
    defects = [""] * settings.n_normal + [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(settings.n_defect)]
    for i in range(n):
        image = _colour(_texture(settings.kind, bool(variant[i]), size, rng), settings.kind, rng)
        if defects[i]:
            masks[i] = _plant(image, defects[i], settings.strength, rng)
        images[i] = np.clip(image, 0.0, 1.0)
    order = rng.permutation(n)  # ids carry no hint of the label
    ids = [f"{settings.kind}_{rank:03d}" for rank in range(n)]
    return TextureCohort(ids, images[order], masks[order], [defects[i] for i in order], variant[order])


def write_texture_cohort(cohort: TextureCohort, folder: str | Path, settings: TextureSettings) -> tuple[Path, Path]:
    """PNG images (`images/`), masks for the defect images (`labels/`; normal images have none)
    and `cohort.json` (settings, defect kind per id) under `folder`; returns the two folders."""
    folder = Path(folder)
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    for sid, image, mask in zip(cohort.ids, cohort.images, cohort.masks):
        with atomic_path(images / f"{sid}.png") as tmp:
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(tmp, format="PNG")
        if mask.any():
            with atomic_path(labels / f"{sid}.png") as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    facts = {"settings": asdict(settings), "defects": dict(zip(cohort.ids, cohort.defects)),
             "variant": dict(zip(cohort.ids, map(bool, cohort.variant)))}
    with atomic_path(folder / "cohort.json") as tmp:
        Path(tmp).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return images, labels
