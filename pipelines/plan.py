"""The plan of a run: every setting and input resolved and checked once, before any work.

A command turns what the user said (`pipelines.screen_config.ScreenConfig`: defaults < config
file < flags) into a frozen `ScreenPlan` in two steps, each check made once:

1. `check_settings(config)`: every setting that needs no file, before OUT and the inputs are
   looked at (a typo is the first error). Typed settings the user changed are built here
   (`PreprocessSettings`, `TokenSettings` / the classical tokenizer's options, `ScoringConfig`)
   and kept; a check that needs torch runs only for such settings, so `volscan screen
   /no/such/dir` still answers at once.
2. `build_plan(subjects, checked)`: the inputs (`pipelines.validation.validate_inputs`), the kind,
   the device, the backbone built with its weights loaded, the cache locations, and the typed
   settings not built in step 1 (their defaults).

Stages take only their part of the plan (`plan.preprocess`, `plan.tokens`, `plan.scoring`,
`plan.outputs`, `plan.cache`); none sees `ScreenConfig`. Adding an option: one field of
`ScreenConfig` (with its flag in `pipelines.commands.screen`), one check in `check_settings`
or in the settings class it feeds, and the plan field that carries it to its stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.cache_locations import CacheLocations, cache_root, cohort_folder
from pipelines.screen_config import CLASSICAL_BACKBONE, DEFAULT_BACKBONE, OutputSettings, ScreenConfig
from pipelines.subjects import Subject
from pipelines.validation import (MAX_HISTOGRAM_BINS, MAX_SEED, check_backbone_kwargs, check_int, decode_images,
                                  load_backbone, validate_inputs)
from volumetric.errors import VolscanError

if TYPE_CHECKING:
    from torch import nn

    from preprocessing.settings import PreprocessSettings
    from volumetric.engine import ScoringConfig
    from volumetric.tokens import TokenSettings


@dataclass(frozen=True)
class ClassicalFeatures:
    """The weights-free tokenizer's settings: `options`, the `volumetric.classical_tokens.ClassicalTokenizer`
    keyword arguments (the config's `tokenizer` table, checked by `check_settings`)."""

    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckedSettings:
    """Step 1 of the plan: `config` (every setting as given, checked) and the typed settings built
    while checking them (None: the user left them at their defaults, built by `build_plan`)."""

    config: ScreenConfig
    preprocess: "PreprocessSettings | None" = None
    tokens: "TokenSettings | ClassicalFeatures | None" = None
    device: str | None = None  # resolved, when the user chose one


@dataclass(frozen=True)
class ScreenPlan:
    """Everything a run does, resolved and checked (see the module docstring).

    `subjects` (sorted as given), `kind` "3d"/"2d", `device` (resolved) and `device_setting`
    (as asked: per-scan workers resolve "auto" on their own node), `method`, `size` (cube edge /
    image side), `seed`, `template` (None = the default search), `backbone` (the loaded model;
    None for classical features), `preprocess`, `tokens`, `scoring`, `outputs`: each stage's
    settings; `cache`: its locations; `record`: every setting as given (report.json)."""

    subjects: tuple[Subject, ...]
    kind: str
    device: str
    device_setting: str
    method: str
    size: int
    seed: int
    template: str | None
    backbone: "nn.Module | None"
    preprocess: "PreprocessSettings"
    tokens: "TokenSettings | ClassicalFeatures"
    scoring: "ScoringConfig"
    outputs: OutputSettings
    cache: CacheLocations
    record: dict[str, Any]

    @property
    def classical(self) -> bool:
        """True for the weights-free classical features (no backbone)."""
        return isinstance(self.tokens, ClassicalFeatures)


def check_settings(config: ScreenConfig) -> CheckedSettings:
    """Step 1 (see the module docstring): numeric options, the backbone name (timm's registry,
    offline), the device and the token, scoring and preprocessing settings the user changed."""
    default = ScreenConfig()

    def changed(*names: str) -> bool:
        return any(getattr(config, name) != getattr(default, name) for name in names)

    check_int("seed", config.seed, 0, MAX_SEED)
    check_int("histogram-bins", config.histogram_bins, 2, MAX_HISTOGRAM_BINS)
    check_int("top", config.top, 0, 1 << 20)
    check_backbone_kwargs(config.backbone_kwargs)
    tokens: TokenSettings | ClassicalFeatures | None = None
    if config.backbone == CLASSICAL_BACKBONE:
        if config.tokenizer:
            tokens = ClassicalFeatures(_classical_options(config.tokenizer))
    else:
        if config.backbone != DEFAULT_BACKBONE:
            _check_backbone_name(config.backbone)
        if changed("layers", "proj_dim", "precision", "slices_per_block", "tokenizer"):
            tokens = config.token_settings()
    device = None
    if changed("device") or config.scoring:
        from volumetric.devices import resolve_device

        device = str(resolve_device(config.device))
        if config.scoring:
            config.scoring_config(device)
    preprocess = None
    if changed("size", "registered", "skull_stripped", "brain_mask", "hdbet_mode", "bias_correction", "preprocess"):
        preprocess = config.preprocess_settings()
    return CheckedSettings(config, preprocess, tokens, device)


def _classical_options(table: dict[str, Any]) -> dict[str, Any]:
    """The `tokenizer` table as the classical tokenizer's options: a ViT-only key or an unknown
    one is refused (never silently dropped), and the values are checked by building it once."""
    from volumetric.classical_tokens import ClassicalTokenizer
    from volumetric.tokens import TokenSettings

    accepted = sorted(inspect.signature(ClassicalTokenizer).parameters)
    vit_only = {f.name for f in dataclasses.fields(TokenSettings)} - set(accepted)
    for key in table:
        if key in vit_only:
            raise VolscanError(f"config 'tokenizer.{key}' applies only to ViT backbones; the classical "
                               f"tokenizer takes {', '.join(accepted)}: remove it")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise VolscanError(f"config 'tokenizer.{key}': unknown to the classical "
                               f"tokenizer (it takes {', '.join(accepted)}){hint}")
    ClassicalTokenizer(**table)
    return dict(table)


def _check_backbone_name(name: str) -> None:
    """timm knows `name`, or one line suggesting close names ('classical' included)."""
    from volumetric.backbones import check_backbone_name

    try:
        check_backbone_name(name)
    except VolscanError:
        if difflib.get_close_matches(name, [CLASSICAL_BACKBONE], cutoff=0.75):
            raise VolscanError(f"unknown backbone {name!r}; did you mean {CLASSICAL_BACKBONE!r} "
                               "(weights-free intensity and texture features)?") from None
        raise


def check_no_3d_settings(config: ScreenConfig) -> None:
    """Refuse the volume-only settings for 2D images (they would be silently dropped)."""
    volume_only = [name for name, value in (("registered", config.registered), ("skull-stripped", config.skull_stripped),
                                            ("brain-mask", config.brain_mask), ("hdbet-mode", config.hdbet_mode),
                                            ("bias-correction", config.bias_correction), ("template", config.template),
                                            ("preprocess", config.preprocess),
                                            ("slices-per-block", config.slices_per_block is not None))
                   if value]
    volume_only += [f"tokenizer {key}" for key in ("slices_per_block", "slice_batch") if key in config.tokenizer]
    if config.backbone != CLASSICAL_BACKBONE and "patch" in config.tokenizer:  # the ViT's finer cube grid
        volume_only.append("tokenizer patch")
    if volume_only:
        raise VolscanError(f"the setting(s) {', '.join(volume_only)} apply to 3D volumes only; remove them for 2D images")


def build_plan(subjects: Sequence[Subject], checked: CheckedSettings, reference_scans: int = 0) -> ScreenPlan:
    """Step 2 (see the module docstring): the inputs checked (`validate_inputs`: files, masks,
    cohort size, template; 2D images decoded), then the device, the backbone loaded and every
    stage's settings; before minutes of preprocessing. `reference_scans`: scans of a
    `--reference` run scored beside `subjects` (they count for the method's minimum cohort)."""
    from volumetric.devices import resolve_device

    config = checked.config
    kind = validate_inputs(subjects, config.method, config.template, reference_scans)
    if kind == "2d":
        check_no_3d_settings(config)
        decode_images(subjects)
    device = checked.device or str(resolve_device(config.device))
    backbone = None if config.backbone == CLASSICAL_BACKBONE else load_backbone(
        config.backbone, config.weights, device, config.seed, config.backbone_kwargs)
    tokens = checked.tokens
    if tokens is None:
        tokens = ClassicalFeatures() if config.backbone == CLASSICAL_BACKBONE else config.token_settings()
    if not isinstance(tokens, ClassicalFeatures):
        tokens = dataclasses.replace(tokens, device=device)
        # a cube edge the backbone's patch cannot reach, or more slices per block than a cube has:
        # refused before the compute (the tokenizer is built after preprocessing)
        from volumetric.backbones import patch_size
        from volumetric.tokens import block_offsets, slice_upsampling

        patch = patch_size(backbone)
        block_offsets(patch // slice_upsampling(patch, tokens.patch), tokens.slices_per_block)
    preprocess = checked.preprocess or config.preprocess_settings()
    root = cache_root(config.cache)
    return ScreenPlan(
        subjects=tuple(subjects), kind=kind, device=device, device_setting=config.device, method=config.method,
        size=config.size, seed=config.seed, template=config.template, backbone=backbone, preprocess=preprocess,
        tokens=tokens, scoring=config.scoring_config(device, kind), outputs=config.outputs(),
        cache=CacheLocations(root, cohort_folder(subjects, kind, preprocess, config.template, root)),
        record=config.to_dict(),
    )
