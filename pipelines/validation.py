"""The one validation pass every command runs before any work.

What `volscan screen` (and `reproduce`, `demo`, which screen too) checks, in this order, each
failure one `VolscanError` line naming the file or option:

1. every setting that needs no file (`check_settings`; commands call it before they look at
   OUT or the inputs, so a typo is the first error): `seed`, `histogram_bins`, `top`, the
   `backbone_kwargs` shape numbers, the device, the backbone name in timm's registry, the token,
   scoring and preprocessing settings (Nyúl cutoff included);
2. the subjects: ids safe to name files with (`pipelines.ids`), supported, existing, unique,
   one kind, headers readable and sane against the file size, big enough, not complex, masks
   on their image's grid (`pipelines.inputs`); 2D images decoded (NaN/Inf pixels, several
   pages, decompression bombs refused); every mask read by the label rule (`pipelines.labels`:
   integer labels >= 0, no lossy 2D format, no colour or translucent 2D mask);
3. enough inputs for the method (CoDeGraph needs 3, MuSc 2), before any token is extracted;
4. the template resolved and loaded (3D);
5. the backbone BUILT and its weights LOADED (hub, file or random), so a broken, mismatched
   or unreadable weights file fails in seconds rather than after the cohort is preprocessed.
   The loaded model is returned so the tokens stage does not load it again.

`volscan preprocess` runs the same file checks on its inputs (`validate_preprocess`).
The output location (no overlap with any input, writable, only volscan's own previous output
replaced) is checked by `pipelines.outputs.check_output_dir`, which every command calls first.
"""

from __future__ import annotations

import difflib

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.ids import check_id
from pipelines.inputs import Subject, nifti_grid, validate_subjects
from volumetric.errors import InputFileError, VolscanError, first_line

if TYPE_CHECKING:
    from torch import nn

    from pipelines.screen_config import ScreenConfig

log = logging.getLogger(__name__)

# Seeds feed numpy, torch and the JL projection generator; 32 bits is what all of them accept.
MAX_SEED = 2**32 - 1
# The streaming voxel AUROC keeps two int64 counters per bin: 2^24 bins is already 256 MiB,
# and beyond 65536 bins the tie error bound is below what real maps resolve.
MAX_HISTOGRAM_BINS = 2**24
# Inputs each scoring method needs: MuSc compares every scan with the others (>= 2); CoDeGraph
# also needs a reference rank beyond its nearest links (>= 3).
MIN_INPUTS = {"musc": 2, "codegraph": 3}


@dataclass(frozen=True)
class CheckedScreen:
    """What the validation pass established: input `kind` ("3d"/"2d"), resolved `device`, and
    the built `backbone` with its weights loaded (hand it to the tokenizer; None for the
    weights-free classical features)."""

    kind: str
    device: str
    backbone: "nn.Module | None"  # None for the weights-free classical tokenizer


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


def check_settings(config: "ScreenConfig") -> None:
    """Every setting that needs no file, template or network, checked first so that a typo is the
    first error reported: numeric options, the device, the backbone name (timm's registry,
    offline), the token, scoring and preprocessing settings. A check that needs torch runs only
    when the user changed what it checks (the defaults are valid), so `volscan screen /no/such/dir`
    still answers at once."""
    from pipelines.screen_config import CLASSICAL_BACKBONE, DEFAULT_BACKBONE, ScreenConfig

    default = ScreenConfig()

    def changed(*names: str) -> bool:
        return any(getattr(config, name) != getattr(default, name) for name in names)

    check_int("seed", config.seed, 0, MAX_SEED)
    check_int("histogram-bins", config.histogram_bins, 2, MAX_HISTOGRAM_BINS)
    check_int("top", config.top, 0, 1 << 20)
    check_backbone_kwargs(config.backbone_kwargs)
    if config.backbone == CLASSICAL_BACKBONE and config.tokenizer:
        import dataclasses
        import inspect

        from volumetric.classical_tokens import ClassicalTokenizer
        from volumetric.tokens import TokenSettings

        accepted = sorted(inspect.signature(ClassicalTokenizer).parameters)
        vit_only = {f.name for f in dataclasses.fields(TokenSettings)} - set(accepted)
        for key in config.tokenizer:
            if key in vit_only:  # refused, never silently dropped
                raise VolscanError(f"config 'tokenizer.{key}' applies only to ViT backbones; the classical "
                                   f"tokenizer takes {', '.join(accepted)}: remove it")
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise VolscanError(f"config 'tokenizer.{key}': unknown to the classical tokenizer "
                                   f"(it takes {', '.join(accepted)}){hint}")
        ClassicalTokenizer(**config.tokenizer)
    elif config.backbone != CLASSICAL_BACKBONE:
        if config.backbone != DEFAULT_BACKBONE:
            _check_backbone_name(config.backbone)
        if changed("layers", "proj_dim", "precision", "slices_per_block", "tokenizer"):
            config.token_settings()
    if changed("device") or config.scoring:
        from pipelines.stages.score import scoring_options
        from volumetric.devices import resolve_device

        device = str(resolve_device(config.device))
        if config.scoring:
            scoring_options(config, device)
    if changed("size", "registered", "skull_stripped", "brain_mask", "preprocess"):
        config.preprocess_settings()


def check_no_3d_settings(config: "ScreenConfig") -> None:
    """Refuse the volume-only settings for 2D images (they would be silently dropped)."""
    volume_only = [name for name, value in (("registered", config.registered), ("skull-stripped", config.skull_stripped),
                                            ("brain-mask", config.brain_mask),
                                            ("bias-correction", config.bias_correction), ("template", config.template),
                                            ("preprocess", config.preprocess),
                                            ("slices-per-block", config.slices_per_block is not None))
                   if value]
    volume_only += [f"tokenizer {key}" for key in ("slices_per_block", "slice_batch") if key in config.tokenizer]
    if volume_only:
        raise VolscanError(f"the setting(s) {', '.join(volume_only)} apply to 3D volumes only; remove them for 2D images")


def _check_backbone_name(name: str) -> None:
    """timm knows `name`, or one line suggesting close names ('classical' included)."""
    from pipelines.screen_config import CLASSICAL_BACKBONE
    from volumetric.backbones import check_backbone_name

    try:
        check_backbone_name(name)
    except VolscanError:
        if difflib.get_close_matches(name, [CLASSICAL_BACKBONE], cutoff=0.75):
            raise VolscanError(f"unknown backbone {name!r}; did you mean {CLASSICAL_BACKBONE!r} "
                               "(weights-free intensity and texture features)?") from None
        raise


def check_cohort_size(n_inputs: int, method: str) -> None:
    """Refuse a cohort too small for `method` (before token extraction)."""
    needed = MIN_INPUTS.get(method, 2)
    if n_inputs < needed:
        raise VolscanError(f"method {method} needs at least {needed} inputs, got {n_inputs}")


def load_backbone(config: "ScreenConfig", device: str) -> "nn.Module | None":
    """Build the configured backbone and load its weights, or one line saying why not (its name
    and settings were checked by `check_settings`). `--backbone classical` has no network: None."""
    from pipelines.screen_config import CLASSICAL_BACKBONE
    from volumetric.backbones import create_backbone

    if config.backbone == CLASSICAL_BACKBONE:
        return None
    try:
        return create_backbone(config.backbone, config.weights, device, random_seed=config.seed,
                               **config.backbone_kwargs)
    except VolscanError:  # already one line naming the problem
        raise
    except Exception as exc:  # timm model constructors assert/raise on odd option values
        raise VolscanError(f"backbone {config.backbone} with backbone_kwargs {config.backbone_kwargs}: "
                           f"cannot be built ({first_line(exc)})") from None


def validate_screen(subjects: Sequence[Subject], config: "ScreenConfig", reference_scans: int = 0) -> CheckedScreen:
    """The validation pass of a screen run (see the module docstring); returns what it built.
    `reference_scans`: scans of a `--reference` run scored beside the subjects (count for the
    method's minimum cohort)."""
    from volumetric.devices import resolve_device

    from pipelines.labels import read_mask

    check_settings(config)
    kind = validate_subjects(subjects, 1 if reference_scans else 2)
    for subject in subjects:  # a bad mask fails now, not at the metrics after the compute
        if subject.label is not None:
            read_mask(subject.label, kind)
    check_cohort_size(len(subjects) + reference_scans, config.method)
    if kind == "3d":
        from preprocessing.template import resolve_template

        resolve_template(config.template)
    else:  # 2D images are small: decode each now, so NaN/Inf pixels fail before the model loads
        from pipelines.images2d import load_image

        check_no_3d_settings(config)
        for subject in subjects:
            load_image(subject.image)
    device = str(resolve_device(config.device))
    return CheckedScreen(kind=kind, device=device, backbone=load_backbone(config, device))


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
