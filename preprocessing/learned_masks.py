"""deepbet, the learned brain extractor whose weights ship inside its wheel (offline).

Returns a (X, Y, Z) bool mask in the input's own voxel order. The model is built once per process
and device (`_models`), so a cohort pays the load once. HD-BET lives in `preprocessing.hdbet`.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np

from preprocessing.io import Volume
from volumetric.errors import VolscanError

DEEPBET_INSTALL = "pip install deepbet"

_models: dict[str, Any] = {}


def deepbet_available() -> bool:
    """True when the `deepbet` package is importable (its weights ship inside it)."""
    return importlib.util.find_spec("deepbet") is not None


def deepbet_mask(volume: Volume, device: str = "cpu") -> np.ndarray:
    """deepbet brain mask of `volume`: (X, Y, Z) bool in its voxel order (threshold 0.5, no dilation)."""
    if not deepbet_available():
        raise VolscanError(f"brain mask method 'deepbet' needs deepbet: {DEEPBET_INSTALL}")
    import nibabel as nib

    extractor = _model(device)
    _, mask, _ = extractor.run(nib.Nifti1Image(np.asarray(volume.array, dtype=np.float32), volume.affine))
    return np.asarray(mask.dataobj) > 0


def _model(device: str) -> Any:
    if device not in _models:
        import torch
        from deepbet import BrainExtraction

        torch_device = torch.device(device)
        with warnings.catch_warnings():  # deepbet's TorchScript files: "torch.jit.load is deprecated"
            warnings.simplefilter("ignore", FutureWarning)
            extractor = BrainExtraction(no_gpu=True)
        extractor.model.to(torch_device)
        extractor.bbox_model.to(torch_device)
        _models[device] = extractor
    return _models[device]
