"""`--export mood`: a run's scores and maps in the MOOD challenge's exchange format.

The Medical Out-of-Distribution Analysis challenge (MICCAI; github.com/MIC-DKFZ/mood) scores
two tasks from files named after each input file (`scripts/evalresults.py`, `eval_dir`: for each
file name in the label folder, the prediction of the same name in the prediction folder):

- sample level: `<input file name>.txt` (e.g. `case01.nii.gz.txt`, as its example
  `pred_simple.py` writes them), whose first line is read as one float, clipped to [0, 1];
- pixel level: a NIfTI of the input's file name and shape (`Array shapes do not match` is
  refused), values clipped to [0, 1].

Both are scored by average precision (`sklearn.metrics.average_precision_score`; the pixel task
over every voxel of every scan at once). volscan writes `OUT/mood/sample/` and
`OUT/mood/pixel/` with:

- the scan score mapped linearly onto [0, 1] over the run's scan scores (lowest 0, highest 1):
  an increasing map, so the sample-level AP (and AUROC) equal volscan's patient metrics;
- each native map (`maps/<id>.nii.gz`, on the input's grid, 0 outside the brain) mapped
  linearly with one range for the whole run, the range of every token score
  (`pipelines.maps.score_range`): voxels keep their order across scans, which the pooled
  pixel AP needs.

Scores are written with 17 significant digits, so no two different values read back equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.choices import EXPORTS
from volumetric.errors import InputFileError, VolscanError

MOOD_DIR = "mood"


def check_exports(exports: Sequence[str], kind: str, subjects: Sequence[Any]) -> None:
    """Refuse an unknown export, MOOD's with 2D inputs (its tasks are volumes) and two inputs
    whose file names are equal (MOOD names its files after the inputs')."""
    for name in exports:
        if name not in EXPORTS:
            raise VolscanError(f"--export must be one of {', '.join(EXPORTS)}, got {name!r}")
    if "mood" not in exports:
        return
    if kind != "3d":
        raise VolscanError("--export mood needs 3D NIfTI volumes (the MOOD challenge scores volumes)")
    seen: dict[str, Path] = {}
    for subject in subjects:
        name = Path(subject.image).name
        if name in seen:
            raise InputFileError(subject.image, f"has the file name of {seen[name]}; --export mood names its files "
                                                "after the inputs', so they must differ")
        seen[name] = Path(subject.image)


def unit_scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` mapped linearly from [low, high] onto [0, 1] (clipped); all 0 when high == low."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def sample_file(out: Path, image: Path) -> Path:
    """The sample-level file of input `image` in run folder `out`."""
    return out / MOOD_DIR / "sample" / f"{image.name}.txt"


def pixel_file(out: Path, image: Path) -> Path:
    """The pixel-level map of input `image` in run folder `out`."""
    return out / MOOD_DIR / "pixel" / image.name


def write_mood_export(layout: Any, subjects: Sequence[Any], elements: Any, maps: Any) -> list[Path]:
    """Write the MOOD files of a run (module docstring) from its `elements`
    (`pipelines.evaluate.RunElements`) and the native maps `maps` (`MapFiles`) already in
    `layout` (`RunLayout`). Returns the files written."""
    import nibabel as nib

    from pipelines.maps import save_map_like, score_range
    from volumetric.atomic_files import atomic_write_bytes

    scores = np.asarray(elements.collection_scores, dtype=np.float64)
    sample = unit_scale(scores, float(scores.min()), float(scores.max()))
    low, high = score_range(elements.element_scores)
    written = []
    for i, subject in enumerate(subjects):
        image = Path(subject.image)
        txt = sample_file(layout.root, image)
        txt.parent.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_bytes(txt, f"{sample[i]:.17g}\n".encode("ascii")))
        native = np.asarray(nib.load(str(layout.root / maps.files[subject.id][0])).dataobj, dtype=np.float64)
        target = pixel_file(layout.root, image)
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(save_map_like(unit_scale(native, low, high).astype(np.float32), image, target))
    return written
