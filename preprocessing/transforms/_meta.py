"""Conversions between MONAI `MetaTensor`s (channel-first, RAS affine in `.affine`) and our arrays."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform

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


class MaskedMapTransform(MapTransform):
    """Dictionary wrapper of an array transform that takes the brain mask: every key's image `x`
    becomes `transform(x, mask)`, the mask read from `mask_key`."""

    def __init__(self, keys: KeysCollection, transform: Callable[[NdarrayOrTensor, NdarrayOrTensor], NdarrayOrTensor],
                 mask_key: str, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], d[self.mask_key])
        return d
