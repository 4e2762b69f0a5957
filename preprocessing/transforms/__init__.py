"""MONAI dictionary (and array) transforms of the volscan preprocessing chain.

Use after `LoadImaged` + `EnsureChannelFirstd` inside `monai.transforms.Compose`:
`ToTemplateCubed` (register, mask, crop, resize; invertible), `BiasFieldCorrectiond` (N4),
`HistogramStandardized` (Nyúl) or the composite `VolscanPreprocessd`. Importing this package
loads nothing from disk.
"""

from preprocessing.transforms.bias_field_correction import BiasFieldCorrection, BiasFieldCorrectiond
from preprocessing.transforms.histogram_standardize import HistogramStandardize, HistogramStandardized
from preprocessing.transforms.to_template_cube import ToTemplateCube, ToTemplateCubed
from preprocessing.transforms.volscan_preprocess import VolscanPreprocessd

__all__ = [
    "BiasFieldCorrection",
    "BiasFieldCorrectiond",
    "HistogramStandardize",
    "HistogramStandardized",
    "ToTemplateCube",
    "ToTemplateCubed",
    "VolscanPreprocessd",
]
