"""`PreprocessSettings`: every option of the preprocessing chain in one frozen object.

Passed whole to `VolumePreprocessor`, `preprocess_cohort`, the MONAI transforms, `volscan
preprocess` and `volscan screen` (its `preprocess` config table), so no layer re-lists the options.
It also derives the cache keys: `spatial_key()` for what changes the cube/mask/mapping,
`landmark_key()` for what changes the Nyúl step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from preprocessing.bias_field import N4Settings
from preprocessing.choices import BIAS_CORRECTIONS, CONTRASTS, HDBET_MODES, MASK_METHODS
from preprocessing.crop_resize import check_cube_size
from preprocessing.intensity import DEFAULT_CUTOFF, check_cutoff
from preprocessing.registration import RegistrationSettings
from volumetric.cache_keys import HDBET_MASK_REVISION, PIPELINE_VERSION
from volumetric.errors import VolscanError


@dataclass(frozen=True)
class PreprocessSettings:
    """Options of the preprocessing chain (defaults = the paper's protocol where it pins them down).

    - `size`: cube edge S in voxels (multiple of 14); `registered`: input already in template
      space; `skull_stripped`: input already skull-stripped (its non-zero voxels are the brain).
    - `brain_mask`: "auto" | "hd-bet" | "deepbet" | "template" | "nonzero" (see
      `preprocessing.brain_mask`); `contrast`: "auto" (guessed from the file name) | "t1" | "t1c"
      | "t2" | "flair" | "pd" | "other", used by `auto`; `hdbet_mode`: "accurate" (HD-BET's
      default: 5 folds x 8 mirrorings) | "fast" (1 fold, no mirroring); `mask_device`: "cpu",
      "cuda", ... for the learned extractors.
    - `margin_mm`, `cubic`: crop box around the template brain; `background_scale`: template-mask
      refinement; `registration`: `RegistrationSettings`.
    - `bias_correction`: "auto" (default) = "n4" for scans volscan registers or skull-strips
      itself, "none" for `registered` *and* `skull_stripped` inputs (their preprocessing is
      someone else's, e.g. BraTS, whose protocol has no bias-field step) (`n4_applies`);
      "none" | "n4" force it off or on. N4 runs on the cube inside the brain mask, before Nyúl
      (`preprocessing.bias_field`): a strongly biased healthy scan otherwise reads as anomalous
      (docs/engine.md: without N4 the lesion-free phantom cohorts flag their most biased
      healthy scans). `n4`: `N4Settings`, used whenever N4 applies (non-default `n4` settings
      with "none" are an error: they would do nothing).
    - `cutoff`: Nyúl quantiles when learning landmarks; `landmarks`: a `.npy` file of fixed
      landmarks to apply instead of learning them (path, or None).
    """

    size: int = 224
    registered: bool = False
    skull_stripped: bool = False
    brain_mask: str = "auto"
    contrast: str = "auto"
    hdbet_mode: str = "accurate"
    mask_device: str = "cpu"
    margin_mm: float = 4.0
    cubic: bool = False
    background_scale: float = 0.5
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    bias_correction: str = "auto"
    n4: N4Settings = field(default_factory=N4Settings)
    cutoff: tuple[float, float] = DEFAULT_CUTOFF
    landmarks: str | None = None

    def __post_init__(self) -> None:
        # Every option is checked here, before any volume is read.
        for name in ("registered", "skull_stripped", "cubic"):
            if not isinstance(getattr(self, name), bool):
                raise VolscanError(f"preprocess {name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise VolscanError(f"preprocess size must be an integer, got {self.size!r}")
        check_cube_size(self.size)
        if self.brain_mask not in MASK_METHODS:
            raise VolscanError(
                f"unknown brain mask method {self.brain_mask!r}; choose one of {', '.join(MASK_METHODS)}"
            )
        if self.contrast not in CONTRASTS:
            raise VolscanError(f"unknown contrast {self.contrast!r}; choose one of {', '.join(CONTRASTS)}")
        if self.hdbet_mode not in HDBET_MODES:
            raise VolscanError(f"unknown HD-BET mode {self.hdbet_mode!r}; choose one of {', '.join(HDBET_MODES)}")
        for name in ("margin_mm", "background_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise VolscanError(f"preprocess {name} must be a number >= 0, got {value!r}")
        if not isinstance(self.registration, RegistrationSettings):
            raise VolscanError(f"preprocess registration must be RegistrationSettings, got {self.registration!r}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise VolscanError(
                f"unknown bias correction {self.bias_correction!r}; choose one of {', '.join(BIAS_CORRECTIONS)}"
            )
        if not isinstance(self.n4, N4Settings):
            raise VolscanError(f"preprocess n4 must be N4Settings, got {self.n4!r}")
        if self.bias_correction == "none" and self.n4 != N4Settings():  # would be silently ignored
            raise VolscanError("preprocess n4 settings are set but bias_correction is none; add bias_correction: n4")
        try:
            cutoff = check_cutoff(self.cutoff)
        except (TypeError, ValueError):
            raise VolscanError(f"Nyúl cutoff must be two numbers (low, high), got {self.cutoff!r}") from None
        object.__setattr__(self, "cutoff", cutoff)
        for name in ("landmarks", "mask_device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, str(value))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], **fixed: Any) -> "PreprocessSettings":
        """Settings from a config table (keys with `-` or `_`; nested `registration` and `n4` tables) plus `fixed`.

        An unknown key, or a key that `fixed` already sets, is a `VolscanError` naming it.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        table = {str(k).replace("-", "_"): v for k, v in values.items()}
        for key in table:
            if key in fixed:
                raise VolscanError(f"config 'preprocess': '{key}' is a top-level setting; set it outside this table")
            if key not in names:
                accepted = sorted(names - set(fixed))
                raise VolscanError(f"config 'preprocess': unknown setting '{key}' (accepted: {', '.join(accepted)})")
        if isinstance(table.get("registration"), dict):
            registration = dict(table["registration"])  # never modify the caller's config
            try:
                if "shrink_factors" in registration:
                    registration["shrink_factors"] = tuple(registration["shrink_factors"])
                if "smoothing_mm" in registration:
                    registration["smoothing_mm"] = tuple(registration["smoothing_mm"])
                table["registration"] = RegistrationSettings(**registration)
            except TypeError as exc:
                raise VolscanError(f"config 'preprocess.registration': {exc}") from None
        if isinstance(table.get("n4"), dict):
            try:  # N4Settings takes `iterations` as a list (a YAML/TOML array) and stores a tuple
                table["n4"] = N4Settings(**{str(k).replace("-", "_"): v for k, v in table["n4"].items()})
            except TypeError as exc:
                raise VolscanError(f"config 'preprocess.n4': {exc}") from None
        if isinstance(table.get("cutoff"), list):
            table["cutoff"] = tuple(table["cutoff"])
        return cls(**table, **fixed)

    @property
    def n4_applies(self) -> bool:
        """Whether N4 runs: "n4", or "auto" on inputs volscan registers or skull-strips itself."""
        if self.bias_correction == "auto":
            return not (self.registered and self.skull_stripped)
        return self.bias_correction == "n4"

    def replace(self, **changes: Any) -> "PreprocessSettings":
        """A copy with `changes` (e.g. per-subject `registered` / `skull_stripped`)."""
        return dataclasses.replace(self, **changes)

    def spatial_key(self, template_identity: str, mask_method: str) -> dict[str, Any]:
        """What changes the cube, mask and mapping (JSON-able), with the resolved `mask_method`.

        `contrast` and `mask_device` act only through the resolved method; HD-BET masks also depend
        on `hdbet_mode`. Bias correction enters only when it applies (`n4_applies`, so "auto" and
        "n4" share stores): without it the key is the one made before it existed.
        """
        key = {
            "version": PIPELINE_VERSION,
            "template": template_identity,
            "size": self.size,
            "registered": self.registered,
            "skull_stripped": self.skull_stripped,
            "mask_method": mask_method,
            "margin_mm": float(self.margin_mm),
            "cubic": self.cubic,
            "background_scale": float(self.background_scale) if mask_method == "template" else None,
            "registration": None if self.registered else self.registration.key(),
        }
        if mask_method == "hd-bet":
            key["hdbet_mode"] = self.hdbet_mode
            key["hdbet_revision"] = HDBET_MASK_REVISION
        if self.n4_applies:
            key.update(bias_correction="n4", n4=self.n4.key())
        return key

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (for reports)."""
        return dataclasses.asdict(self)

