"""Nested tables of a config file checked against the settings classes they feed.

`scoring` becomes `volumetric.engine.ScoringConfig` (with its `codegraph` and `engine` tables) and
`preprocess` becomes `preprocessing.settings.PreprocessSettings` (with `registration` and `n4`).
Those constructors would reject an unknown key only with Python's own `__init__()` message, with
no file and no key path, and would take a value of the wrong type as it comes. Here every key of
such a table is checked while the file is read: an unknown key is one line with the file, the
key path (`scoring.subset`) and the closest known path (`did you mean 'scoring.engine.subsets'?`,
searched over the whole table, since a key is often right but at the wrong depth); a value of
the wrong type is one line with the file, the key path and the expected type. Keys may use `-`
or `_`; the checked table comes back with `_` keys. Value ranges stay with the classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator
from typing import Any

from volumetric.errors import VolscanError


def _table_classes() -> dict[str, tuple[type, frozenset[str]]]:
    """Config table -> (settings dataclass, fields that are top-level settings instead)."""
    from preprocessing.settings import PreprocessSettings
    from volumetric.engine import ScoringConfig

    return {
        "scoring": (ScoringConfig, frozenset()),
        "preprocess": (PreprocessSettings, frozenset({"size", "registered", "skull_stripped"})),
    }


def check_table(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """`table` (the config's `name` table) with `_` keys, every key known and every value of
    its field's type; a `VolscanError` naming the key path otherwise."""
    cls, top_level = _table_classes()[name]
    return _check(table, cls, name, top_level, _paths(cls, name, top_level))


def _fields(cls: type, top_level: frozenset[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init and f.name not in top_level}


def _paths(cls: type, prefix: str, top_level: frozenset[str] = frozenset()) -> list[str]:
    """Every key path under `prefix` (nested dataclass fields included)."""
    out = []
    for name, hint in _fields(cls, top_level).items():
        path = f"{prefix}.{name}"
        out.append(path)
        if dataclasses.is_dataclass(hint):
            out.extend(_paths(hint, path))
    return out


def _suggestion(path: str, known: list[str]) -> str:
    """' (did you mean 'x.y'?)' for the known path whose last key is closest to `path`'s."""
    leaf = path.rsplit(".", 1)[1]
    leaves: dict[str, list[str]] = {}
    for candidate in known:
        leaves.setdefault(candidate.rsplit(".", 1)[1], []).append(candidate)
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if not close:
        return ""
    parent = path.rsplit(".", 1)[0]
    # Among equal leaves prefer the one at the same depth, then the shallowest.
    best = min(leaves[close[0]], key=lambda p: (p.rsplit(".", 1)[0] != parent, p.count(".")))
    return f"; did you mean '{best}'?"


def _check(table: Any, cls: type, path: str, top_level: frozenset[str], known: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise VolscanError(f"'{path}' must be a table/mapping, got {table!r}")
    fields = _fields(cls, top_level)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        key_path = f"{path}.{name}"
        if name in top_level:
            raise VolscanError(f"'{key_path}' is a top-level setting; set '{name}' outside the '{path}' table")
        if name not in fields:
            here = ", ".join(sorted(fields))
            raise VolscanError(f"unknown setting '{key_path}'{_suggestion(key_path, known)} (in '{path}': {here})")
        hint = fields[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out[name] = _check(value, hint, key_path, frozenset(), known)
            continue
        expected = _describe_mismatch(value, hint)
        if expected is not None:
            raise VolscanError(f"'{key_path}' must be {expected}, got {value!r}")
        out[name] = value
    return out


def _options(hint: Any) -> Iterator[Any]:
    """The members of a union hint (`int | None` -> int, NoneType), else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        yield from typing.get_args(hint)
    else:
        yield hint


def _describe_mismatch(value: Any, hint: Any) -> str | None:
    """None when `value` (from YAML/TOML) fits `hint`, else what the hint expects, in words."""
    wanted = []
    for option in _options(hint):
        fits, words = _fits(value, option)
        if fits:
            return None
        wanted.append(words)
    return " or ".join(dict.fromkeys(wanted))


def _fits(value: Any, hint: Any) -> tuple[bool, str]:
    if hint is Any:
        return True, "anything"
    if hint is type(None):
        return value is None, "empty (null)"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint)), "a table"
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        words = f"a list of {_fits(0, args[0])[1].removeprefix('an ').removeprefix('a ')}s" if args else "a list"
        if not isinstance(value, (list, tuple)):
            return False, words
        return all(_fits(v, args[0] if len(args) == 1 else a)[0]
                   for v, a in zip(value, args if len(args) > 1 else [args[0]] * len(value))) if args else True, words
    return True, "anything"  # a type this check does not model: the settings class checks it
