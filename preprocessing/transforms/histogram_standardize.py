"""`HistogramStandardize` / `HistogramStandardized`: Nyúl standardisation with stored landmarks.

Wraps `preprocessing.intensity.standardize` (torchio's `HistogramStandardization`, applying the
cutoff stored with the landmarks). Voxels outside the brain mask become 0.
"""

from __future__ import annotations

import os

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from preprocessing.intensity import Landmarks, standardize
from preprocessing.transforms._meta import MaskedMapTransform


class HistogramStandardize(Transform):
    """(1, X, Y, Z) image + (1, X, Y, Z) brain mask → (1, X, Y, Z) float32 on the landmarks' scale."""

    def __init__(self, landmarks: Landmarks | str | os.PathLike[str]) -> None:
        self.landmarks = landmarks if isinstance(landmarks, Landmarks) else Landmarks.load(landmarks)

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor) -> NdarrayOrTensor:
        """Returns the type it was given (MetaTensor keeps its metadata)."""
        image = convert_to_numpy(img)[0]
        brain = convert_to_numpy(mask)[0] > 0
        out, *_ = convert_to_dst_type(standardize(image, brain, self.landmarks)[None], img)
        return out


class HistogramStandardized(MaskedMapTransform):
    """Dictionary wrapper: standardise `keys` using the mask under `mask_key`."""

    def __init__(
        self,
        keys: KeysCollection,
        landmarks: Landmarks | str | os.PathLike[str],
        mask_key: str = "brain_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, HistogramStandardize(landmarks), mask_key, allow_missing_keys)
