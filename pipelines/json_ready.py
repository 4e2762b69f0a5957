"""JSON-ready copies of settings objects (what report.json records of a run's settings)."""

from __future__ import annotations

from typing import Any


def plain(obj: Any) -> Any:
    """JSON-ready copy of a dataclass config (other objects as their repr)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {name: plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)
