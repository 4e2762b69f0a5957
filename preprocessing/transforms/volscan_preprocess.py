"""`VolscanPreprocessd`: the whole volscan chain as one MONAI dictionary transform.

Register/mask/crop/resize (`ToTemplateCubed`), then Nyúl (`HistogramStandardized`) when
landmarks are given. Learn landmarks on the cohort first (`volscan preprocess` or
`preprocessing.intensity.learn_landmarks`): one volume cannot standardise itself. `inverse`
undoes the spatial part (intensities stay standardised), e.g. for `monai.transforms.Invertd`.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from preprocessing.intensity import Landmarks
from preprocessing.template import Template
from preprocessing.transforms.histogram_standardize import HistogramStandardized
from preprocessing.transforms.to_template_cube import ToTemplateCubed


class VolscanPreprocessd(MapTransform, InvertibleTransform):
    """`keys[0]`: the image to register; other keys follow it (see `ToTemplateCubed`).

    `landmarks`: Nyúl landmarks (`.npy` path or `Landmarks`) applied to `image_keys`
    (default: `keys[0]` only, so labels stay labels); None = no intensity step.
    """

    def __init__(
        self,
        keys: KeysCollection,
        template: Template | str | os.PathLike[str] | None = None,
        size: int = 224,
        registered: bool = False,
        skull_stripped: bool = False,
        mask_method: str = "auto",
        landmarks: Landmarks | str | os.PathLike[str] | None = None,
        mask_key: str = "brain_mask",
        mode: Sequence[str] | str = "bilinear",
        image_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **preprocessor_kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spatial = ToTemplateCubed(
            keys, template, size, registered, skull_stripped, mask_method, mask_key, mode,
            allow_missing_keys, **preprocessor_kwargs,
        )
        self.intensity = (
            None
            if landmarks is None
            else HistogramStandardized(image_keys or self.keys[0], landmarks, mask_key, allow_missing_keys)
        )

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = self.spatial(data)
        return d if self.intensity is None else self.intensity(d)

    def inverse(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        return self.spatial.inverse(data)
