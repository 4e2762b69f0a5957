"""Conversions between MONAI `MetaTensor`s (channel-first, RAS affine in `.affine`) and our arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from preprocessing.io import Volume
from volumetric.errors import VolscanError


def to_volume(img: MetaTensor) -> Volume:
    """(1, X, Y, Z) MetaTensor (as from `LoadImaged` + `EnsureChannelFirstd`) → `Volume`."""
    if not isinstance(img, MetaTensor):
        raise VolscanError(
            f"volscan transforms need a MetaTensor with an affine (got {type(img).__name__}); "
            "load with monai.transforms.LoadImaged and EnsureChannelFirstd"
        )
    name = img.meta.get("filename_or_obj")
    if img.ndim != 4 or img.shape[0] != 1:
        raise VolscanError(f"{name or 'image'}: expected one channel-first 3D volume (1, X, Y, Z), got {tuple(img.shape)}")
    array = img[0].detach().cpu().numpy().astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise VolscanError(f"{name or 'image'}: contains NaN/Inf voxels")
    path = Path(name) if isinstance(name, str) and name else None
    return Volume(array=array, affine=img.affine.detach().cpu().numpy().astype(np.float64), path=path)


def to_meta(array: np.ndarray, affine: np.ndarray, like: MetaTensor | None) -> MetaTensor:
    """(X, Y, Z) array + RAS affine → (1, X, Y, Z) MetaTensor keeping `like`'s other metadata and history."""
    meta = {} if like is None else {k: v for k, v in like.meta.items() if k != "affine"}
    ops = [] if like is None else list(like.applied_operations)
    return MetaTensor(
        torch.as_tensor(np.ascontiguousarray(array)[None]),
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta=meta,
        applied_operations=ops,
    )
