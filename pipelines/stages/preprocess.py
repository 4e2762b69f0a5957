"""Stage 2 of `volscan screen`: scans to model inputs.

3D: `preprocessing.cohort.preprocess_cohort` into the cache (`<cache>/preprocess/<digest>`,
resumable, one set of Nyúl landmarks for the cohort, per-subject `registered` /
`skull_stripped`). 2D: read and resize to `size`^2. Arrays are loaded lazily, one at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.inputs import Subject
from pipelines.screen_config import ScreenConfig
from volumetric.cache_keys import preprocess_store, store_name
from volumetric.errors import VolscanError


@dataclass
class Prepared:
    """Per-subject model inputs: `load[i]()` -> (cube or image, brain mask or None);
    `mappings[i]`: `NativeMapping` (3D); `info`: facts for the report."""

    load: list[Callable[[], tuple[np.ndarray, np.ndarray | None]]]
    mappings: list[Any] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def checked_table(table: dict[str, Any], target: Callable[..., Any], fixed: set[str], name: str) -> dict[str, Any]:
    """Refuse keys of a config table that `target` does not accept (or that volscan sets itself)."""
    accepted = set(inspect.signature(target).parameters) - fixed
    for key in table:
        if key not in accepted:
            raise VolscanError(
                f"config '{name}': unknown setting '{key}' (accepted: {', '.join(sorted(accepted)) or 'none'})"
            )
    return dict(table)


def cohort_folder(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path) -> Path:
    """The cohort's preprocessing store, `<cache>/preprocess/<name>` (3D; used by `volscan extract`
    too): one folder per cohort and spatial settings, named by `volumetric.cache_keys.store_name`
    (no path in it: jobs that mount the inputs, the template or the cache elsewhere share it)."""
    from pipelines.inputs import input_kind
    from preprocessing.template import find_template_folder, template_files

    template = (template_files(find_template_folder(config.template))
                if input_kind([s.image for s in subjects]) == "3d" else None)  # 2D: its extract logs only
    settings = config.preprocess_settings()
    name = store_name([(s.id, s.image) for s in subjects], config.size, template,
                      settings.n4.key() if settings.n4_applies else None)
    return preprocess_store(cache_root, name)


def prepare(subjects: list[Subject], kind: str, config: ScreenConfig, cache_root: Path,
            *, compute: bool = True) -> Prepared:
    """Model inputs of every subject (see the module docstring); 3D settings come whole from
    `config.preprocess_settings()`. `compute=False` (`volscan score`): 3D scans must already be
    preprocessed (by `volscan extract`); missing, stale or damaged ones are an error naming them,
    and nothing is written into the shared store."""
    size = config.size
    if kind == "2d":
        from pipelines.images2d import load_image, resize

        def image_loader(path: Path) -> Callable[[], tuple[np.ndarray, None]]:
            return lambda: (resize(load_image(path), (size, size)), None)

        for subject in subjects:  # fail on a corrupt image now, not after the model loaded
            load_image(subject.image)
        return Prepared(load=[image_loader(s.image) for s in subjects], info={"resized_to": [size, size]})

    from pipelines.distributed.per_scan import spec_of
    from preprocessing.cohort import preprocess_cohort
    from preprocessing.template import find_template_folder

    folder = cohort_folder(subjects, config, cache_root)
    if compute:
        from preprocessing.store import mark_used

        result = preprocess_cohort([spec_of(s) for s in subjects], folder, config.preprocess_settings(),
                                   template=config.template, stale="recompute")
        mark_used(folder)
    else:  # read-only: the store is shared with other parts and runs
        from pipelines.distributed.completeness import require_extracted

        result = require_extracted(subjects, config, cache_root)
    loads = [lambda r=record: (r.load_image(), r.load_mask()) for record in result.records]
    return Prepared(
        load=loads,
        mappings=[record.load_mapping() for record in result.records],
        info={"cache": str(folder.resolve()), "preprocessed_now": len(result.computed),
              "template": str(find_template_folder(config.template).resolve()),
              "landmarks": str(Path(result.landmarks_path).resolve()),
              # Per subject: the brain extractor used and any warning (template fallback) for the report.
              "brain_mask": {r.id: r.brain_mask for r in result.records},
              "warnings": {r.id: list(r.warnings) for r in result.records if r.warnings}},
    )
