"""The one-volume chain: register → brain mask → crop the template's brain box → resize to S³
(→ N4 bias-field correction inside the brain mask, when `settings.n4_applies`).

Spatial steps are composed into a single resampling (registration ∘ crop box ∘ resize), so each
input is interpolated once. Registered mode skips only the registration: the crop box still
comes from the template's brain, so it needs the template too (a clear error without one;
using the input's full grid instead would break spatial correspondence with other cohorts).
Learned extractors (HD-BET, deepbet) run on the input's own grid; their mask is carried into the
cube with the same mapping (nearest neighbour).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from preprocessing.bias_field import correct_bias_field
from preprocessing.brain_mask import MaskChoice, choose_mask_method, nonzero_mask, refine_template_mask
from preprocessing.crop_resize import brain_crop_box, crop_and_resize, cube_affine
from preprocessing.io import Volume, load_volume
from preprocessing.hdbet import check_hdbet, hdbet_installed, hdbet_mask
from preprocessing.learned_masks import DEEPBET_INSTALL, deepbet_available, deepbet_mask
from preprocessing.native_mapping import NativeMapping
from preprocessing.registration import prepare_image, register_affine
from preprocessing.settings import PreprocessSettings
from preprocessing.template import Template, resolve_template
from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpatialResult:
    """`cube` (S, S, S) float32 input intensities (divided by the N4 field with bias correction
    "n4"), `brain_mask` (S, S, S) bool, `mapping` back and forth, and `mask` (which extractor made
    the brain mask, and its warning if any)."""

    cube: np.ndarray
    brain_mask: np.ndarray
    mapping: NativeMapping
    mask: MaskChoice


class VolumePreprocessor:
    """Preprocess single volumes with one `PreprocessSettings` and one template.

    `template`: a `Template`, a template folder, or None (resolved by `resolve_template`).
    An explicitly chosen extractor that is not installed is refused here, before any volume.
    """

    def __init__(
        self,
        settings: PreprocessSettings = PreprocessSettings(),
        template: Template | str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(settings, PreprocessSettings):
            raise VolscanError(f"settings must be a PreprocessSettings, got {type(settings).__name__}")
        self.settings = settings
        self.template = template if isinstance(template, Template) else resolve_template(template)
        method = settings.brain_mask
        if method == "deepbet" and not deepbet_available():
            raise VolscanError(f"brain mask method 'deepbet' needs deepbet: {DEEPBET_INSTALL}")
        if method == "hd-bet":
            check_hdbet()
        # deepbet scored a higher Dice than HD-BET in both modes on the heads measured, in seconds
        # (docs/preprocessing.md): `auto` takes HD-BET only without deepbet, and only on a GPU
        # (on a CPU HD-BET costs a CPU minute (fast) to tens of minutes (accurate) per scan).
        self._hdbet_ready = method == "auto" and settings.mask_device.startswith("cuda") and hdbet_installed()
        self._deepbet_ready = method == "auto" and deepbet_available()
        self.box = brain_crop_box(self.template.brain_mask, self.template.image.affine, settings.margin_mm, settings.cubic)
        self.cube_affine = cube_affine(self.box, settings.size)
        self._template_cube_mask: np.ndarray | None = None
        self._fixed_image: sitk.Image | None = None

    def mask_choice(self, path: str | os.PathLike[str] | None) -> MaskChoice:
        """The extractor this scan gets (depends on its file name when the contrast is "auto")."""
        s = self.settings
        return choose_mask_method(s.brain_mask, s.skull_stripped, s.contrast, path, self._hdbet_ready, self._deepbet_ready)

    def settings_key(self, path: str | os.PathLike[str] | None = None) -> dict:
        """Every setting that changes the output for the scan at `path` (JSON-able; part of cache keys)."""
        return self.settings.spatial_key(self.template.identity, self.mask_choice(path).method)

    def __call__(self, volume: Volume | str | os.PathLike[str]) -> SpatialResult:
        """Preprocess one volume (or a path to one) into the cube; see `SpatialResult`."""
        if not isinstance(volume, Volume):
            volume = load_volume(volume)
        name = volume.path if volume.path is not None else "volume"
        if float(volume.array.min()) == float(volume.array.max()):
            raise InputFileError(name, f"has one constant intensity ({volume.array.flat[0]:g}) and no content")
        if self.settings.registered:
            world = np.eye(4)
        else:
            moving = prepare_image(volume.array, volume.affine, self.settings.registration)
            world = register_affine(moving, self._fixed(), self.settings.registration)
        mapping = NativeMapping(
            native_shape=tuple(int(s) for s in volume.array.shape),
            native_affine=volume.affine,
            size=self.settings.size,
            cube_affine=self.cube_affine,
            template_to_native=world,
        )
        cube = mapping.to_cube(volume.array, order=1)
        choice = self.mask_choice(volume.path)
        if choice.warning:
            log.warning("%s: %s", name, choice.warning)
        mask = self._brain_mask(choice.method, volume, cube, mapping)
        if not mask.any():
            hint = " (is it really in template space?)" if self.settings.registered else ""
            raise InputFileError(name, f"brain mask ({choice.method}) is empty inside the template's crop box{hint}")
        if self.settings.n4_applies:
            # Fitted in the cube: its grid is the same for every scan, and Nyúl learns on it next.
            spacing = np.linalg.norm(self.cube_affine[:3, :3], axis=0)  # column norms = voxel sizes (mm)
            cube = correct_bias_field(cube, mask, spacing, self.settings.n4, str(name))
        return SpatialResult(cube=cube, brain_mask=mask, mapping=mapping, mask=choice)

    def _fixed(self) -> sitk.Image:
        # Skull-stripped input registers to the skull-stripped template: like with like.
        if self._fixed_image is None:
            fixed = self.template.brain if self.settings.skull_stripped else self.template.image.array
            self._fixed_image = prepare_image(fixed, self.template.image.affine, self.settings.registration)
        return self._fixed_image

    def _brain_mask(self, method: str, volume: Volume, cube: np.ndarray, mapping: NativeMapping) -> np.ndarray:
        s = self.settings
        if method == "nonzero":
            return mapping.to_cube(nonzero_mask(volume.array), order=0)
        if method == "deepbet":
            return mapping.to_cube(deepbet_mask(volume, s.mask_device), order=0)
        if method == "hd-bet":
            return mapping.to_cube(hdbet_mask(volume, s.hdbet_mode, s.mask_device), order=0)
        return refine_template_mask(cube, self.template_cube_mask(), s.background_scale)

    def template_cube_mask(self) -> np.ndarray:
        """The template's brain mask in the cube, (S, S, S) bool (computed once)."""
        if self._template_cube_mask is None:
            self._template_cube_mask = crop_and_resize(
                self.template.brain_mask, self.template.image.affine, self.box, self.settings.size, order=0
            )
        return self._template_cube_mask
