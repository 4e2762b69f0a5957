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
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from volumetric.errors import InputFileError, VolscanError

METHODS = ("codegraph", "musc")
# DINOv2 ViT-L/14 (the paper's backbone) as timm names it.
DEFAULT_BACKBONE = "vit_large_patch14_dinov2.lvd142m"
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
    template: str | None = None
    cache: str | None = None
    seed: int = 0
    top: int = 6
    histogram_bins: int = 65536
    scoring: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `VolscanError` naming the first bad setting."""
        if self.method not in METHODS:
            raise VolscanError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.size < PATCH or self.size % PATCH:
            raise VolscanError(f"size must be a positive multiple of {PATCH} (the ViT patch), got {self.size}")
        if self.proj_dim is not None and self.proj_dim < 1:
            raise VolscanError(f"proj-dim must be positive, got {self.proj_dim}")
        if self.layers is not None and not self.layers:
            raise VolscanError("layers must name at least one backbone layer")
        if self.top < 0:
            raise VolscanError(f"top must be >= 0, got {self.top}")
        if self.histogram_bins < 2:
            raise VolscanError(f"histogram-bins must be >= 2, got {self.histogram_bins}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of every setting (goes into report.json)."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(ScreenConfig)}
_TABLES = {"scoring", "backbone_kwargs", "tokenizer", "preprocess"}
_PATHS = {"weights", "template", "cache"}


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
        return str(value)
    if name == "proj_dim":
        expected = int
    if expected is bool:
        if not isinstance(value, bool):
            raise VolscanError(f"'{name}' must be true or false, got {value!r}")
        return value
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VolscanError(f"'{name}' must be an integer, got {value!r}")
    if expected is str and not isinstance(value, str):
        raise VolscanError(f"'{name}' must be a string, got {value!r}")
    return value


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
        raise InputFileError(path, f"cannot parse config file: {str(exc).splitlines()[0]}") from None
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
