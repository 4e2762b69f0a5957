"""The checks of the one validation pass every command runs before any work.

What `volscan screen` (and `extract`, `score`, `reproduce`, `demo`) checks, in this order, each
failure one `VolscanError` line naming the file or option (`pipelines.plan` runs the pass):

1. every setting that needs no file (`pipelines.plan.check_settings`, with `check_int` and
   `check_backbone_kwargs` from here; commands call it before they look at OUT or the inputs,
   so a typo is the first error): `seed`, `histogram_bins`, `top`, the `backbone_kwargs` shape
   numbers, the device, the backbone name in timm's registry, the token, scoring and
   preprocessing settings (Nyúl cutoff included);
2. the subjects: ids safe to name files with (`pipelines.ids`), supported, existing, unique,
   one kind, headers readable and sane against the file size, big enough, not complex, masks
   on their image's grid (`pipelines.subjects`); 2D images decoded (NaN/Inf pixels, several
   pages, decompression bombs refused); every mask read by the label rule (`pipelines.labels`:
   integer labels >= 0, no lossy 2D format, no colour or translucent 2D mask);
3. enough inputs for the method (CoDeGraph needs 3, MuSc 2), before any token is extracted;
4. the template resolved and loaded (3D);
5. the backbone BUILT and its weights LOADED (hub, file or random), so a broken, mismatched
   or unreadable weights file fails in seconds rather than after the cohort is preprocessed.
   The loaded model goes into the plan so the tokens stage does not load it again.

`volscan preprocess` runs the same file checks on its inputs (`validate_preprocess`).
The output location (no overlap with any input, writable, only volscan's own previous output
replaced) is checked by `pipelines.run_folder.check_output_dir`, which every command calls first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.ids import check_id
from pipelines.images2d import load_image
from pipelines.labels import read_mask
from pipelines.subjects import Subject, nifti_grid, validate_subjects
from volumetric.errors import InputFileError, VolscanError, first_line

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# Seeds feed numpy, torch and the JL projection generator; 32 bits is what all of them accept.
MAX_SEED = 2**32 - 1
# The streaming voxel AUROC keeps two int64 counters per bin: 2^24 bins is already 256 MiB,
# and beyond 65536 bins the tie error bound is below what real maps resolve.
MAX_HISTOGRAM_BINS = 2**24
# Inputs each scoring method needs: MuSc compares every scan with the others (>= 2); CoDeGraph
# also needs a reference rank beyond its nearest links (>= 3).
MIN_INPUTS = {"musc": 2, "codegraph": 3}


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int within [low, high], else `VolscanError` naming the option `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise VolscanError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise VolscanError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_backbone_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse the ViT shape options timm would crash on (depth < 1, a width not divisible by the heads)."""
    for name in ("depth", "embed_dim", "num_heads"):
        if name in kwargs:
            check_int(f"backbone_kwargs {name}", kwargs[name], 1, 1 << 16)
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise VolscanError(f"backbone_kwargs embed_dim {dim} is not divisible by num_heads {heads}")


def check_cohort_size(n_inputs: int, method: str) -> None:
    """Refuse a cohort too small for `method` (before token extraction)."""
    needed = MIN_INPUTS.get(method, 2)
    if n_inputs < needed:
        raise VolscanError(f"method {method} needs at least {needed} inputs, got {n_inputs}")


def load_backbone(name: str, weights: str | None, device: str, seed: int,
                  kwargs: dict[str, Any]) -> "nn.Module":
    """Build the ViT backbone `name` and load its `weights` (None = timm hub, a file, "random"),
    or one line saying why not (its name and settings were checked by `pipelines.plan.check_settings`)."""
    from volumetric.backbones import create_backbone

    try:
        return create_backbone(name, weights, device, random_seed=seed, **kwargs)
    except VolscanError:  # already one line naming the problem
        raise
    except Exception as exc:  # timm model constructors assert/raise on odd option values
        raise VolscanError(f"backbone {name} with backbone_kwargs {kwargs}: "
                           f"cannot be built ({first_line(exc)})") from None


def validate_inputs(subjects: Sequence[Subject], method: str, template: str | None, reference_scans: int = 0) -> str:
    """The file checks of a screen run (see the module docstring, 2-4; 2D images are decoded by
    `decode_images`); returns the kind, "3d" or "2d". `reference_scans`: scans of a `--reference`
    run scored beside the subjects (they count for the method's minimum cohort)."""
    kind = validate_subjects(subjects, 1 if reference_scans else 2)
    for subject in subjects:  # a bad mask fails now, not at the metrics after the compute
        if subject.label is not None:
            read_mask(subject.label, kind)
    check_cohort_size(len(subjects) + reference_scans, method)
    if kind == "3d":
        from preprocessing.template import resolve_template

        resolve_template(template)
    return kind


def decode_images(subjects: Sequence[Subject]) -> None:
    """2D images are small: decode each now, so NaN/Inf pixels fail before the model loads."""
    for subject in subjects:
        load_image(subject.image)


def validate_preprocess(paths: Sequence[Path], template: str | None = None, landmarks: str | None = None) -> None:
    """The file checks of `volscan preprocess`, before any volume is processed: every id (from
    the file name) by the screen's rule, the template resolved, a reused landmarks file read, every NIfTI header checked (DICOM series are read
    in full later). Its settings (`PreprocessSettings`, `--workers`) are checked before this."""
    from preprocessing.intensity import Landmarks
    from preprocessing.io import subject_id
    from preprocessing.template import resolve_template

    # The store names its files by id, as a screen names its outputs: the same rule (pipelines.ids).
    for path in paths:
        check_id(subject_id(path), path, len(paths))
    resolve_template(template)
    if landmarks is not None:
        if not Path(landmarks).is_file():
            raise InputFileError(landmarks, "landmarks file not found")
        Landmarks.load(landmarks)
    for path in paths:
        if path.is_file():
            nifti_grid(path)
