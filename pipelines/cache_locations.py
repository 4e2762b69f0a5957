"""Where a run's per-scan work is cached: the cache root and the folders below it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.subjects import Subject
from volumetric.cache_keys import extract_logs, preprocess_store, store_name, tokens_root

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
        return tokens_root(self.root)

    @property
    def extract_logs(self) -> Path:
        """Where `volscan extract` runs of this cohort keep their error logs: `<root>/extract/<cohort digest>`."""
        return extract_logs(self.root, self.store.name)


def cohort_folder(subjects: Sequence[Subject], kind: str, settings: "PreprocessSettings", template: str | None,
                  cache_root: Path) -> Path:
    """The cohort's preprocessing store, `<cache>/preprocess/<name>` (3D; used by `volscan extract`
    too): one folder per cohort and spatial settings, named by `volumetric.cache_keys.store_name`
    (no path in it: jobs that mount the inputs, the template or the cache elsewhere share it)."""
    from preprocessing.template import find_template_folder, template_files

    template_paths = (template_files(find_template_folder(template))
                      if kind == "3d" else None)  # 2D: its extract logs only
    name = store_name([(s.id, s.image) for s in subjects], settings.size, template_paths,
                      settings.n4.key() if settings.n4_applies else None)
    return preprocess_store(cache_root, name)
