"""`VolscanPreprocessd`: the whole volscan chain as one MONAI dictionary transform.

Register/mask/crop/resize (`ToTemplateCubed`; with `settings.n4_applies` its
`VolumePreprocessor` also divides `keys[0]` by its N4 field, and `BiasFieldCorrectiond` does the
same for the other `image_keys`), then Nyúl (`HistogramStandardized`) when `settings.landmarks`
names a landmarks file. Learn landmarks on the cohort first (`volscan preprocess` or
`preprocessing.intensity.learn_landmarks`): one volume cannot standardise itself. `inverse`
undoes the spatial part (intensities stay standardised), e.g. for `monai.transforms.Invertd`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import ensure_tuple

from preprocessing.settings import PreprocessSettings
from preprocessing.template import Template
from preprocessing.transforms.bias_field_correction import BiasFieldCorrectiond
from preprocessing.transforms.histogram_standardize import HistogramStandardized
from preprocessing.transforms.to_template_cube import ToTemplateCubed


class VolscanPreprocessd(MapTransform, InvertibleTransform):
    """`keys[0]`: the image to register; other keys follow it (see `ToTemplateCubed`).

    `settings.landmarks`: Nyúl landmarks (`.npy` path) applied to `image_keys` (default:
    `keys[0]` only, so labels stay labels); None = no Nyúl step. When
    `settings.n4_applies` every image key is divided by its own N4 field first.
    """

    def __init__(
        self,
        keys: KeysCollection,
        settings: PreprocessSettings = PreprocessSettings(),
        template: Template | str | os.PathLike[str] | None = None,
        mask_key: str = "brain_mask",
        mode: Sequence[str] | str = "bilinear",
        image_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spatial = ToTemplateCubed(keys, settings, template, mask_key, mode, allow_missing_keys)
        images = ensure_tuple(image_keys or self.keys[0])
        # keys[0] is corrected inside the spatial step (VolumePreprocessor); the other images here.
        others = [k for k in images if k != self.keys[0]]
        self.bias = (
            BiasFieldCorrectiond(others, settings.n4, mask_key, allow_missing_keys=allow_missing_keys)
            if settings.n4_applies and others else None
        )
        self.intensity = (
            None
            if settings.landmarks is None
            else HistogramStandardized(images, settings.landmarks, mask_key, allow_missing_keys)
        )

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = self.spatial(data)
        for step in (self.bias, self.intensity):
            d = d if step is None else step(d)
        return d

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        return self.spatial.inverse(data)
