"""`ToTemplateCube` / `ToTemplateCubed`: register, brain-mask, crop and resize into the template cube.

The array transform wraps `preprocessing.volume.VolumePreprocessor` (one resampling per input)
and records the `NativeMapping` in the MetaTensor's history, so `inverse` puts a cube-space array
(an anomaly map, the mask) back on the input's own grid. The dictionary wrapper registers the
first key and carries every other key (co-registered modalities, labels) with the same mapping.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, ensure_tuple_rep

from preprocessing.native_mapping import NativeMapping
from preprocessing.settings import PreprocessSettings
from preprocessing.template import Template
from preprocessing.transforms._meta import to_meta, to_volume
from preprocessing.volume import VolumePreprocessor
from volumetric.errors import InputFileError, VolscanError

_ORDERS = {"nearest": 0, "bilinear": 1, "trilinear": 1, "bicubic": 3}


class ToTemplateCube(InvertibleTransform, Transform):
    """(1, X, Y, Z) MetaTensor → ((1, S, S, S) cube, (1, S, S, S) uint8 brain mask), both in template cube space.

    Arguments are those of `VolumePreprocessor` (the template is loaded once, here); with
    `settings.n4_applies` the cube is divided by its N4 field, as there.
    """

    def __init__(
        self,
        settings: PreprocessSettings = PreprocessSettings(),
        template: Template | str | os.PathLike[str] | None = None,
    ) -> None:
        self.preprocessor = VolumePreprocessor(settings, template)

    def __call__(self, img: MetaTensor) -> tuple[MetaTensor, MetaTensor]:
        result = self.preprocessor(to_volume(img))
        cube = self._record(to_meta(result.cube, result.mapping.cube_affine, img), result.mapping, 1)
        mask = self._record(to_meta(result.brain_mask.astype("uint8"), result.mapping.cube_affine, img), result.mapping, 0)
        return cube, mask

    def apply_mapping(self, img: MetaTensor, mapping: NativeMapping, mode: str = "bilinear") -> MetaTensor:
        """Carry another (1, X, Y, Z) array on the same input grid into the cube with `mapping`."""
        order = _order(mode)
        volume = to_volume(img)
        same_grid = volume.array.shape == tuple(mapping.native_shape) and np.allclose(
            volume.affine, mapping.native_affine, atol=1e-3
        )
        if not same_grid:
            raise InputFileError(volume.path or "array", "its grid does not match the registered image's grid")
        cube = mapping.to_cube(volume.array, order=order)
        return self._record(to_meta(cube, mapping.cube_affine, img), mapping, order)

    def inverse(self, data: MetaTensor) -> MetaTensor:
        """(1, S, S, S) cube-space MetaTensor → (1, X, Y, Z) on the input's grid (same interpolation as forward)."""
        op = self.pop_transform(data)
        mapping = NativeMapping.from_dict(op[TraceKeys.EXTRA_INFO]["mapping"])
        order = op[TraceKeys.EXTRA_INFO]["order"]
        native = mapping.to_native(data[0].detach().cpu().numpy(), order=order)
        return to_meta(native, mapping.native_affine, data)

    def _record(self, img: MetaTensor, mapping: NativeMapping, order: int) -> MetaTensor:
        self.push_transform(
            img, orig_size=mapping.native_shape, extra_info={"mapping": mapping.to_dict(), "order": order}
        )
        return img

    @staticmethod
    def mapping_of(img: MetaTensor) -> NativeMapping:
        """The `NativeMapping` recorded by the most recent `ToTemplateCube` on `img`."""
        for op in reversed(img.applied_operations):
            if op.get(TraceKeys.CLASS_NAME) == ToTemplateCube.__name__:
                return NativeMapping.from_dict(op[TraceKeys.EXTRA_INFO]["mapping"])
        raise VolscanError("this tensor has no ToTemplateCube step in its history")


class ToTemplateCubed(MapTransform, InvertibleTransform):
    """Dictionary wrapper: `keys[0]` is registered; other keys follow with the same mapping (and
    without N4, which corrects `keys[0]` only: other keys may be labels; see `VolscanPreprocessd`).

    `settings`, `template`: see `ToTemplateCube`; `mask_key` receives the brain mask; `mode`:
    interpolation per key ("bilinear" for images, "nearest" for labels), a string or one per key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        settings: PreprocessSettings = PreprocessSettings(),
        template: Template | str | os.PathLike[str] | None = None,
        mask_key: str = "brain_mask",
        mode: Sequence[str] | str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = ToTemplateCube(settings, template)
        self.mask_key = mask_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            _order(m)

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        mapping = None
        for key, mode in self.key_iterator(d, self.mode):
            if mapping is None:
                d[key], d[self.mask_key] = self.transform(d[key])
                mapping = ToTemplateCube.mapping_of(d[key])
            else:
                d[key] = self.transform.apply_mapping(d[key], mapping, mode)
        return d

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in (*self.key_iterator(d), self.mask_key):
            if key in d and isinstance(d[key], MetaTensor) and d[key].applied_operations:
                d[key] = self.transform.inverse(d[key])
        return d


def _order(mode: str) -> int:
    if mode not in _ORDERS:
        raise VolscanError(f"unknown interpolation mode {mode!r}; choose one of {', '.join(_ORDERS)}")
    return _ORDERS[mode]
