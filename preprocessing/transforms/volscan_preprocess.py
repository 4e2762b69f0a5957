"""`VolscanPreprocessd`: the whole volscan chain as one MONAI dictionary transform.

Register/mask/crop/resize (`ToTemplateCubed`), then Nyúl (`HistogramStandardized`) when
`settings.landmarks` names a landmarks file. Learn landmarks on the cohort first (`volscan preprocess` or
`preprocessing.intensity.learn_landmarks`): one volume cannot standardise itself. `inverse`
undoes the spatial part (intensities stay standardised), e.g. for `monai.transforms.Invertd`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from preprocessing.settings import PreprocessSettings
from preprocessing.template import Template
from preprocessing.transforms.histogram_standardize import HistogramStandardized
from preprocessing.transforms.to_template_cube import ToTemplateCubed


class VolscanPreprocessd(MapTransform, InvertibleTransform):
    """`keys[0]`: the image to register; other keys follow it (see `ToTemplateCubed`).

    `settings.landmarks`: Nyúl landmarks (`.npy` path) applied to `image_keys` (default:
    `keys[0]` only, so labels stay labels); None = no intensity step.
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
        self.intensity = (
            None
            if settings.landmarks is None
            else HistogramStandardized(image_keys or self.keys[0], settings.landmarks, mask_key, allow_missing_keys)
        )

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = self.spatial(data)
        return d if self.intensity is None else self.intensity(d)

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        return self.spatial.inverse(data)
