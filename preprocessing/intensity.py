"""Nyúl histogram standardisation (torchio's `HistogramStandardization`) learned on a cohort.

Landmarks are learned from each cube's brain voxels (after the spatial steps), averaged over the
cohort by torchio's own routines, and saved as `.npy` (torchio's format: the 1-D landmark array)
with a JSON sidecar holding the cutoff quantiles. torchio's transform always applies its default
cutoff, whatever the landmarks were trained with, so we keep the cutoff with the landmarks and
pass it back when applying. The cutoff must satisfy `low < 0.1 < 0.9 < high` so that the
landmark set (cutoffs, deciles, quartiles) has torchio's 13 entries.
Default cutoff (0.01, 0.99) and output range 0–100 are torchio's (and Nyúl's) defaults.
Voxels outside the brain mask are set to 0 after standardisation (the tokenizer's void rule).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchio as tio
from torchio.transforms.preprocessing.intensity import histogram_standardization as _hs

from volumetric.atomic_files import atomic_write_bytes
from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

DEFAULT_CUTOFF = tuple(_hs.DEFAULT_CUTOFF)
N_LANDMARKS = 13


@dataclass(frozen=True)
class Landmarks:
    """Nyúl landmarks (13,) on the standard scale, and the `cutoff` quantiles they were learned with."""

    values: np.ndarray
    cutoff: tuple[float, float] = DEFAULT_CUTOFF

    @property
    def digest(self) -> str:
        """Short content hash (part of the cache key of standardised outputs)."""
        payload = np.asarray(self.values, dtype=np.float64).tobytes() + json.dumps(self.cutoff).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def save(self, path: str | os.PathLike[str], extra: dict | None = None) -> Path:
        """Write `path` (.npy, torchio-compatible) and `path` with `.json` (cutoff + `extra`) atomically."""
        path = Path(path)
        if path.suffix != ".npy":
            raise VolscanError(f"{path}: landmarks are saved as .npy (torchio's .pth/.txt cannot round-trip)")
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(self.values, dtype=np.float64))
        atomic_write_bytes(path.with_suffix(".json"), json.dumps({**(extra or {}), "cutoff": list(self.cutoff)}).encode())
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Landmarks":
        """Read `.npy` landmarks (+ `.json` cutoff sidecar; torchio's default cutoff if absent)."""
        path = Path(path)
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputFileError(path, f"not a landmarks .npy file ({exc})") from None
        if values.shape != (N_LANDMARKS,) or not np.all(np.isfinite(values)) or np.any(np.diff(values) < 0):
            raise InputFileError(path, f"expected {N_LANDMARKS} increasing finite landmarks, got shape {values.shape}")
        cutoff = DEFAULT_CUTOFF
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                cutoff = tuple(float(v) for v in json.loads(sidecar.read_text(encoding="utf-8"))["cutoff"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InputFileError(sidecar, f"unreadable landmarks sidecar ({exc})") from None
        else:
            log.info("%s has no .json sidecar; using torchio's default cutoff %s", path, DEFAULT_CUTOFF)
        return cls(values=values, cutoff=check_cutoff(cutoff))


def check_cutoff(cutoff: Iterable[float]) -> tuple[float, float]:
    """Validate (low, high) quantiles: 0 <= low < 0.1 and 0.9 < high <= 1."""
    low, high = (float(v) for v in cutoff)
    if not (0 <= low < 0.1 and 0.9 < high <= 1):
        raise VolscanError(f"Nyúl cutoff must satisfy 0 <= low < 0.1 and 0.9 < high <= 1, got ({low}, {high})")
    return low, high


def landmark_percentiles(cutoff: tuple[float, float]) -> np.ndarray:
    """The 13 percentiles (0–100) whose values are the landmarks: cutoffs, deciles and quartiles."""
    return _hs._get_percentiles(tuple(100 * np.asarray(check_cutoff(cutoff))))


def learn_landmarks(
    volumes: Iterable[tuple[np.ndarray, np.ndarray]], cutoff: tuple[float, float] = DEFAULT_CUTOFF
) -> Landmarks:
    """Average Nyúl landmarks over (image (X, Y, Z), brain mask (X, Y, Z) bool) pairs."""
    cutoff = check_cutoff(cutoff)
    percentiles = landmark_percentiles(cutoff)
    rows = []
    for image, mask in volumes:
        voxels = np.asarray(image, dtype=np.float32)[np.asarray(mask, dtype=bool)]
        if voxels.size == 0:
            raise VolscanError("cannot learn Nyúl landmarks from a volume with an empty brain mask")
        rows.append(np.percentile(voxels, percentiles))
    if not rows:
        raise VolscanError("cannot learn Nyúl landmarks from an empty cohort")
    return Landmarks(values=_hs._get_average_mapping(np.vstack(rows)), cutoff=cutoff)


class _CutoffHistogramStandardization(tio.HistogramStandardization):
    """torchio's transform, but applying the cutoff the landmarks were learned with."""

    def __init__(self, landmarks: Landmarks, **kwargs) -> None:
        super().__init__({"image": np.asarray(landmarks.values)}, masking_method="mask", **kwargs)
        self.cutoff = landmarks.cutoff

    def apply_normalization(self, subject: tio.Subject, image_name: str, mask: torch.Tensor) -> None:
        image = subject.get_scalar_image(image_name)
        landmarks = self.landmarks_dict[image_name]
        image.set_data(_hs._normalize(image.data, landmarks, mask=mask.numpy(), cutoff=self.cutoff))


def standardize(image: np.ndarray, mask: np.ndarray, landmarks: Landmarks) -> np.ndarray:
    """Nyúl-standardise `image` (X, Y, Z) using its `mask` (X, Y, Z) bool voxels; 0 outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise VolscanError("cannot standardise a volume with an empty brain mask")
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.as_tensor(np.asarray(image, dtype=np.float32)[None].copy())),
        mask=tio.LabelMap(tensor=torch.as_tensor(mask[None].astype(np.uint8))),
    )
    out = _CutoffHistogramStandardization(landmarks)(subject)
    return np.where(mask, out["image"].data[0].numpy(), 0).astype(np.float32)
