"""Whole-scan acquisition artefacts for healthy phantom scans: the odd scans of a real cohort.

A cohort of hundreds of scans holds some with motion, a spike, wrap-around, missing slices or the
wrong sequence. They carry no lesion (their labels stay 0) but are anomalous everywhere and alike
to nothing, which is what a detector must survive without flagging healthy scans around them
(docs/engine.md, "Link-selection stop"). Each artefact acts on the rendered native image (scanner
units, after noise), along its first voxel axis as the phase-encoding direction:

- `ghosting` (motion): two copies shifted by 1/8 and 1/4 of the field of view, at 35 % and 15 %;
- `spike` (herringbone): a plane-wave stripe pattern of 12 % of the image maximum over the head;
- `wrap`: the outer 20 % of the field of view on each side folded onto the opposite side;
- `missing-slices`: 4-8 consecutive slices along the last axis set to 0;
- `contrast` (wrong sequence): intensities inverted inside the head (T1-like: CSF dark, white
  matter bright), same range.
"""

from __future__ import annotations

import numpy as np

from volumetric.errors import VolscanError

ARTEFACTS = ("ghosting", "spike", "wrap", "missing-slices", "contrast")


def check_artefacts(names: tuple[str, ...]) -> None:
    """Raise VolscanError unless every name is one of `ARTEFACTS` (and there is at least one)."""
    unknown = [n for n in names if n not in ARTEFACTS]
    if not names or unknown:
        raise VolscanError(f"artefacts must be among {', '.join(ARTEFACTS)}, got {', '.join(names) or 'none'}")


def apply_artefact(image: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """`image` (X, Y, Z) float32 >= 0 with artefact `name`; a new float32 array (the input is kept)."""
    check_artefacts((name,))
    out = image.astype(np.float32, copy=True)
    head = out > 0.05 * out.max()
    if name == "ghosting":
        step = max(1, out.shape[0] // 8)
        return out + 0.35 * np.roll(image, step, axis=0) + 0.15 * np.roll(image, 2 * step, axis=0)
    if name == "spike":
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in out.shape], indexing="ij"))
        phase = np.tensordot(direction, grid, axes=1) * (2 * np.pi / rng.uniform(3.0, 6.0))
        return np.clip(out + 0.12 * out.max() * np.cos(phase) * head, 0.0, None)
    if name == "wrap":
        edge = max(1, out.shape[0] // 5)
        out[:edge] += image[-edge:]
        out[-edge:] += image[:edge]
        return out
    if name == "missing-slices":
        count = int(rng.integers(4, 9))
        start = int(rng.integers(out.shape[2] // 4, max(out.shape[2] // 4 + 1, 3 * out.shape[2] // 4 - count)))
        out[:, :, start : start + count] = 0.0
        return out
    top = np.percentile(out[head], 99.5) if head.any() else 0.0
    return np.where(head, np.clip(top - out, 0.0, None) + 0.05 * top, out).astype(np.float32)
