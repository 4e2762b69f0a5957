"""Settings of a `volscan screen` run: defaults, a YAML/TOML config file, CLI overrides.

Precedence: built-in defaults < config file < command-line flags. Config keys are the long
CLI flag names (`proj-dim` and `proj_dim` both work) plus nested tables handed to the other
packages unchanged: `scoring` (fields of `volumetric.engine.ScoringConfig`), `backbone_kwargs`
(timm model keyword arguments, e.g. `{depth: 3, embed_dim: 48, num_heads: 2}` for tiny test
models), `tokenizer` (extra `VolumeTokenizer`/`ImageTokenizer` keyword arguments) and
`preprocess` (extra `preprocess_cohort` keyword arguments). An unknown key is an error that
names it; nothing is silently ignored. Relative paths in a config file (`weights`, `template`,
`cache`) are relative to the file's folder; on the command line, to the working directory.

Defaults the paper does not pin down:
- `top = 6` scans shown as montages in the report: one screen of figures, enough to see
  whether the top of the ranking shares a pattern (a consistent anomaly) or not.
- `histogram_bins = 65536` for the streaming voxel AUROC: its tie error bound is ~1e-5 on
  real maps while the counters stay at 1 MiB (see `volumetric.metrics.ScoreHistogram`).
- `device = "auto"`: the first CUDA GPU when torch sees one, else the CPU.
- `flag_z = 3.0`: a scan is flagged when its score is more than 3 robust standard deviations
  (1.4826 * MAD) above the cohort median (`pipelines.flagging`); the same number is the map
  threshold of the hotspot regions, the report's panels and the viewer's slider start.
- `viewer_scans = 20`: the report's viewer embeds each scan it shows (its .nii.gz bytes, the map
  as uint8) in the run folder; 20 top-ranked scans (plus any flagged one) keep a large cohort's
  run folder from doubling the cohort's size, and cover what a reader opens.

The typed settings of each stage are built from here, once per run, by `pipelines.plan` (which
holds them in the `ScreenPlan`; no stage sees `ScreenConfig`): `preprocess_settings()`
(`preprocessing.settings.PreprocessSettings`, every option of the chain, from the
`preprocess` table + `size`/`registered`/`skull_stripped`/`brain_mask`/`bias_correction`/`hdbet_mode`),
`token_settings()`
(`volumetric.tokens.TokenSettings`: the model flags + the `tokenizer` table; the classical
tokenizer takes the table as its own arguments), `scoring_config()` (`volumetric.engine.ScoringConfig`
with `EngineOptions`) and `outputs()`. Each derives its own cache key
(`PreprocessSettings.spatial_key`, the tokenizer's `settings`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.choices import METHODS, listed
from pipelines.config_schema import check_table
from volumetric.errors import InputFileError, VolscanError

# DINOv2 ViT-L/14 (the paper's backbone) as timm names it.
DEFAULT_BACKBONE = "vit_large_patch14_dinov2.lvd142m"
# The weights-free tokenizer (volumetric.classical_tokens.CLASSICAL_BACKBONE; not imported: no torch here).
CLASSICAL_BACKBONE = "classical"
PATCH = 14


@dataclass
class ScreenConfig:
    """Every setting of a screen run; `None` means "the owning module's default"."""

    method: str = "codegraph"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # None = timm hub, a file path, or "random"
    layers: list[int] | None = None
    size: int = 224
    proj_dim: int | None = None
    device: str = "auto"
    registered: bool = False
    skull_stripped: bool = False
    brain_mask: str | None = None  # None = the `preprocess` table's, else "auto" (PreprocessSettings)
    bias_correction: str | None = None  # None = the `preprocess` table's, else "none" (PreprocessSettings)
    hdbet_mode: str | None = None  # None = the `preprocess` table's, else "accurate" (PreprocessSettings)
    template: str | None = None
    cache: str | None = None
    seed: int = 0
    top: int = 6
    histogram_bins: int = 65536
    flag_z: float = 3.0
    viewer_scans: int = 20
    precision: str | None = None  # None = TokenSettings' default ("auto")
    slices_per_block: int | None = None  # None = all 14 slices of each block
    window: int | None = None  # None = the `scoring.engine` table's, else global search (EngineOptions)
    scoring: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `VolscanError` naming the first bad setting."""
        if self.backbone == CLASSICAL_BACKBONE:
            # Set explicitly (None / {} = not set): a setting the classical tokenizer would silently drop.
            vit_only = [name for name, value in (("weights", self.weights), ("layers", self.layers),
                                                 ("proj-dim", self.proj_dim), ("backbone_kwargs", self.backbone_kwargs),
                                                 ("precision", self.precision),
                                                 ("slices-per-block", self.slices_per_block))
                        if value is not None and value != {}]
            if vit_only:
                one = len(vit_only) == 1
                raise VolscanError(f"--backbone classical has no neural network; {', '.join(vit_only)} "
                                   f"{'applies' if one else 'apply'} only to ViT backbones: remove {'it' if one else 'them'}")
        if self.method not in METHODS:
            raise VolscanError(f"method must be {listed(METHODS)}, got {self.method!r}")
        if self.size < PATCH or self.size % PATCH:
            raise VolscanError(f"size must be a positive multiple of {PATCH} (the ViT patch), got {self.size}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise VolscanError(f"proj-dim must be positive, got {self.proj_dim}")
        if self.layers is not None and not self.layers:
            raise VolscanError("layers must name at least one backbone layer")
        if self.top < 0:
            raise VolscanError(f"top must be >= 0, got {self.top}")
        if self.window is not None and self.window < 0:
            raise VolscanError(f"window must be >= 0 (grid cells), got {self.window}")
        if self.histogram_bins < 2:
            raise VolscanError(f"histogram-bins must be >= 2, got {self.histogram_bins}")
        if self.viewer_scans < 0:
            raise VolscanError(f"viewer-scans must be >= 0, got {self.viewer_scans}")
        if not self.flag_z > 0:
            raise VolscanError(f"flag-z must be > 0, got {self.flag_z}")

    def preprocess_settings(self) -> Any:
        """Every preprocessing option, typed and checked (`PreprocessSettings`): the config's
        `preprocess` table plus the top-level `size`, `registered` and `skull_stripped`
        (`brain_mask`, `bias_correction` and `hdbet_mode`, when set, win over the table's; an explicit
        `bias_correction` none also drops the table's `n4` options)."""
        from preprocessing.settings import PreprocessSettings

        table = dict(self.preprocess)
        for name in ("brain_mask", "bias_correction", "hdbet_mode"):  # the flag wins over the table; else the table's or the default
            if getattr(self, name) is not None:
                table[name] = getattr(self, name)
        if self.bias_correction == "none":  # `--bias-correction none` over a config with N4 on: no N4, no options
            table.pop("n4", None)
        return PreprocessSettings.from_mapping(
            table, size=self.size, registered=self.registered, skull_stripped=self.skull_stripped
        )

    def token_settings(self, device: str | None = None) -> Any:
        """Every token setting, typed and checked (`volumetric.tokens.TokenSettings`, ViT
        backbones): the top-level backbone/weights/backbone_kwargs/layers/proj-dim/seed/device
        plus the config's `tokenizer` table (void_fraction, percentiles, value_range, precision,
        slices_per_block, final_norm, slice_batch). `device`: the resolved one (default: the setting)."""
        from volumetric.tokens import TokenSettings

        own = {"backbone", "weights", "backbone_kwargs", "layers", "proj_dim", "seed", "device"}
        accepted = {f.name for f in dataclasses.fields(TokenSettings)} - own
        unknown = sorted(set(self.tokenizer) - accepted)
        if unknown:
            raise VolscanError(f"config 'tokenizer': unknown setting '{unknown[0]}' (accepted: {', '.join(sorted(accepted))})")
        table = {k: tuple(v) if isinstance(v, list) else v for k, v in self.tokenizer.items()}
        top: dict[str, Any] = dict(backbone=self.backbone, weights=self.weights, backbone_kwargs=dict(self.backbone_kwargs),
                                   seed=self.seed, device=device or self.device)
        if self.layers is not None:
            top["layers"] = tuple(self.layers)
        if self.proj_dim is not None:
            top["proj_dim"] = self.proj_dim
        for name in ("precision", "slices_per_block"):  # flags win over the table
            if getattr(self, name) is not None:
                table[name] = getattr(self, name)
        return TokenSettings(**top, **table)

    def scoring_config(self, device: str, kind: str = "3d") -> Any:
        """`volumetric.engine.ScoringConfig` from the config's `scoring` table (nested `codegraph`
        table -> `CoDeGraph`, `engine` table -> `EngineOptions`); the engine runs on the screen's
        device and seed unless the `engine` table says otherwise. LNAMD's border: MuSc's zero
        padding for volumes, windows moved inside the grid for 2D images (`kind` "2d"), where the
        grid's edge is the image's edge (`volumetric.engine.lnamd`), unless the table sets it;
        `window` (the flag) wins over the table's."""
        from volumetric.engine import CoDeGraph, EngineOptions, ScoringConfig

        settings = dict(self.scoring)
        settings.setdefault("lnamd_border", "shift" if kind == "2d" else "zero")
        try:
            engine = {"device": device, "seed": self.seed, **dict(settings.get("engine") or {})}
            if self.window is not None:
                engine["window"] = self.window
            settings["engine"] = EngineOptions(**engine)
            if isinstance(settings.get("codegraph"), dict):
                settings["codegraph"] = CoDeGraph(**settings["codegraph"])
            for name in ("lnamd_radii", "rscin"):
                if isinstance(settings.get(name), list):
                    settings[name] = tuple(settings[name])
            return ScoringConfig(**settings)
        except TypeError as exc:
            raise VolscanError(f"config 'scoring': {exc}") from None

    def outputs(self) -> "OutputSettings":
        """What the scan-maps and report stages need (report figures, flag rule, metric histogram)."""
        return OutputSettings(top=self.top, flag_z=float(self.flag_z), histogram_bins=self.histogram_bins,
                              viewer_scans=self.viewer_scans)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of every setting (goes into report.json)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OutputSettings:
    """`top`: scans drawn as panels in the report; `flag_z`: robust z of the flag rule;
    `histogram_bins`: bins of the streaming voxel AUROC; `viewer_scans`: scans in the report's
    viewer (the top-ranked ones, plus every flagged one; 0 = no viewer)."""

    top: int = 6
    flag_z: float = 3.0
    histogram_bins: int = 65536
    viewer_scans: int = 20


_FIELDS = {f.name: f for f in dataclasses.fields(ScreenConfig)}
_TABLES = {"scoring", "backbone_kwargs", "tokenizer", "preprocess"}
_PATHS = {"weights", "template", "cache"}
# Tables whose every key and value type is checked against the settings class it feeds
# (`pipelines.config_schema`); `backbone_kwargs` (timm's) and `tokenizer` are checked where built.
_SCHEMA_TABLES = ("scoring", "preprocess")


def _check_type(name: str, value: Any) -> Any:
    """Coerce/validate one setting's type; the error message names the key."""
    default = ScreenConfig()
    expected = type(getattr(default, name))
    if name in _TABLES:
        if not isinstance(value, dict):
            raise VolscanError(f"'{name}' must be a table/mapping, got {type(value).__name__}")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    if value is None:
        if getattr(default, name) is None:
            return None
        raise VolscanError(f"'{name}' cannot be empty")
    if name == "layers":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise VolscanError(f"'layers' must be a list of integers, got {value!r}")
        return value
    if name in _PATHS:
        if not isinstance(value, str):
            raise VolscanError(f"'{name}' must be a path (a string), got {value!r}")
        return value
    if name in ("proj_dim", "slices_per_block", "window"):
        expected = int
    if expected is bool:
        if not isinstance(value, bool):
            raise VolscanError(f"'{name}' must be true or false, got {value!r}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and (isinstance(value, bool) or not isinstance(value, float)):
        raise VolscanError(f"'{name}' must be a number, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VolscanError(f"'{name}' must be an integer, got {value!r}")
    if expected is str and not isinstance(value, str):
        raise VolscanError(f"'{name}' must be a string, got {value!r}")
    return value


def _parse_problem(exc: Exception) -> str:
    """'line L, column C: problem' for a YAML error (its first line alone names neither);
    TOML errors already say where."""
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.YAMLError) and mark is not None:
        problem = " ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(exc).splitlines()[0]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into checked `ScreenConfig` keys."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raise InputFileError(path, "config file must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot parse config file: {_parse_problem(exc)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InputFileError(path, "config file must hold a mapping of settings")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(n.replace("_", "-") if n not in _TABLES else n for n in _FIELDS))
            raise InputFileError(path, f"unknown setting '{key}' (known: {known})")
        try:
            settings[name] = _check_type(name, value)
            if name in _SCHEMA_TABLES:
                settings[name] = check_table(name, settings[name])
        except VolscanError as exc:
            raise InputFileError(path, str(exc)) from None
        if name in _PATHS and settings[name] is not None and settings[name] != "random":
            # Paths in a config file are relative to the file, so a project folder can move.
            settings[name] = str(path.parent / Path(settings[name]).expanduser())
    return settings


def resolve_config(config_file: str | Path | None = None, **overrides: Any) -> ScreenConfig:
    """Defaults, then `config_file`, then `overrides` whose value is not None (CLI flags)."""
    settings = read_config_file(config_file) if config_file is not None else {}
    for name, value in overrides.items():
        if name not in _FIELDS:
            raise VolscanError(f"unknown setting '{name}'")
        if value is not None:
            settings[name] = _check_type(name, value)
    return ScreenConfig(**settings)
