"""Where a run's per-scan work is cached: the cache root and the folders below it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.subjects import Subject

if TYPE_CHECKING:
    from preprocessing.settings import PreprocessSettings


def cache_root(cache: str | None) -> Path:
    """The cache root, absolute: `cache` (`--cache`), else `$VOLSCAN_CACHE_DIR` or
    `~/.cache/volscan` (shared with preprocessing, outside OUT so `--force` re-runs keep their
    cached tokens)."""
    from preprocessing.template import cache_dir

    return (Path(cache).expanduser() if cache else cache_dir()).resolve()


@dataclass(frozen=True)
class CacheLocations:
    """`root` (holds `tokens/`, `preprocess/` and `extract/`) and `store`, the cohort's
    preprocessing store `<root>/preprocess/<cohort digest>` (`cohort_folder`;
    2D: named only, for the extract logs)."""

    root: Path
    store: Path

    @property
    def tokens(self) -> Path:
        """The token cache (`volumetric.token_cache.TokenCache` root)."""
        return self.root / "tokens"

    @property
    def extract_logs(self) -> Path:
        """Where `volscan extract` runs of this cohort keep their error logs: `<root>/extract/<cohort digest>`."""
        return self.root / "extract" / self.store.name


def digest(obj: Any) -> str:
    """Short content key of a JSON-able object (cache folder names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cohort_folder(subjects: Sequence[Subject], kind: str, settings: "PreprocessSettings", template: str | None,
                  cache_root: Path) -> Path:
    """The cohort's preprocessing store, `<cache>/preprocess/<digest>` (3D; used by `volscan extract` too).

    One folder per cohort and spatial settings: other cohorts never evict it. The name holds no
    path: the inputs by subject id and content fingerprint (`preprocessing.store.content_fingerprint`,
    a few sampled blocks per file) and the template by its files' content, so jobs that mount the
    inputs, the template or the cache at other paths, or spell them otherwise, share one store.
    When N4 applies (`n4`, or `auto` on raw scans), `bias_correction` and `n4` are part of the
    name (screens with and without N4 get their own stores)."""
    from preprocessing.store import content_fingerprint, content_hash
    from preprocessing.template import find_template_folder, template_files

    template_key = ([content_hash(path) for path in template_files(find_template_folder(template))]
                    if kind == "3d" else None)  # 2D: its extract logs only
    key = {"inputs": sorted((s.id, content_fingerprint(s.image)) for s in subjects), "size": settings.size,
           "template": template_key}
    if settings.n4_applies:
        key.update(bias_correction="n4", n4=settings.n4.key())
    cohort = digest(key)
    return cache_root / "preprocess" / cohort
