"""`BiasFieldCorrection` / `BiasFieldCorrectiond`: N4 bias-field correction inside a brain mask.

Wraps `preprocessing.bias_field.correct_bias_field` (each channel divided by its own N4 field,
fitted on the mask's positive voxels). `VolscanPreprocessd` runs it when
`settings.n4_applies`; use it alone on images already in a common space, e.g.
after `ToTemplateCubed` or on registered, skull-stripped scans loaded with `LoadImaged`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from preprocessing.bias_field import N4Settings, correct_bias_field
from preprocessing.transforms._meta import MaskedMapTransform
from volumetric.errors import VolscanError


class BiasFieldCorrection(Transform):
    """(C, X, Y, Z) or (X, Y, Z) image + brain mask ((X, Y, Z) or (1, X, Y, Z), > 0 = brain) →
    the image's shape, float32, each channel divided by its N4 field.

    `spacing`: voxel size in mm per axis; None = the column norms of a MetaTensor's affine (its
    voxel sizes), else 1 mm. It only sets the image metadata N4 sees: the control grid is points
    per axis over the image's extent (see `preprocessing.bias_field.n4_log_field`). Returns the type it was given (a MetaTensor keeps its metadata and
    history). A channel with too few positive brain voxels is an `InputFileError` naming the
    MetaTensor's file.
    """

    def __init__(self, settings: N4Settings = N4Settings(), spacing: Sequence[float] | None = None) -> None:
        if not isinstance(settings, N4Settings):
            raise VolscanError(f"settings must be N4Settings, got {type(settings).__name__}")
        self.settings = settings
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor) -> NdarrayOrTensor:
        image = convert_to_numpy(img).astype(np.float32)
        name = str(img.meta.get("filename_or_obj") or "image") if isinstance(img, MetaTensor) else "image"
        if image.ndim not in (3, 4):
            raise VolscanError(f"{name}: bias correction needs a (C, X, Y, Z) or (X, Y, Z) image, got {image.shape}")
        brain = convert_to_numpy(mask) > 0
        if brain.ndim == 4 and brain.shape[0] == 1:
            brain = brain[0]
        if brain.shape != image.shape[-3:]:
            raise VolscanError(f"{name}: brain mask shape {brain.shape} does not match the image's {image.shape[-3:]}")
        spacing = self.spacing
        if spacing is None:
            spacing = (tuple(float(v) for v in np.linalg.norm(convert_to_numpy(img.affine)[:3, :3], axis=0))
                       if isinstance(img, MetaTensor) else (1.0, 1.0, 1.0))
        channels = image if image.ndim == 4 else image[None]
        out = np.stack([correct_bias_field(c, brain, spacing, self.settings, name) for c in channels])
        out, *_ = convert_to_dst_type(out if image.ndim == 4 else out[0], img,
                                      dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return out


class BiasFieldCorrectiond(MaskedMapTransform):
    """Dictionary wrapper: correct `keys` with the brain mask under `mask_key` (see `BiasFieldCorrection`)."""

    def __init__(
        self,
        keys: KeysCollection,
        settings: N4Settings = N4Settings(),
        mask_key: str = "brain_mask",
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, BiasFieldCorrection(settings, spacing), mask_key, allow_missing_keys)
