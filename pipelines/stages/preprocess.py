"""Stage 2 of `volscan screen`: scans to model inputs.

3D: `preprocessing.cohort.preprocess_cohort` into the cache (`<cache>/preprocess/<digest>`,
resumable, one set of Nyúl landmarks for the cohort, per-subject `registered` /
`skull_stripped`). 2D: read and resize to `size`^2. Arrays are loaded lazily, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.cache_locations import CacheLocations
from pipelines.distributed.completeness import require_extracted
from pipelines.images2d import load_image, resize
from pipelines.subjects import Subject

if TYPE_CHECKING:
    from preprocessing.settings import PreprocessSettings


@dataclass
class Prepared:
    """Per-subject model inputs: `load[i]()` -> (cube or image, brain mask or None);
    `mappings[i]`: `NativeMapping` (3D); `info`: facts for the report."""

    load: list[Callable[[], tuple[np.ndarray, np.ndarray | None]]]
    mappings: list[Any] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def prepare(subjects: Sequence[Subject], kind: str, settings: "PreprocessSettings", template: str | None,
            cache: CacheLocations, *, compute: bool = True) -> Prepared:
    """Model inputs of every subject (see the module docstring), by `settings` (3D: every option;
    2D: the side `settings.size`) into the cohort's store `cache.store`. `compute=False` (`volscan
    score`): 3D scans must already be preprocessed (by `volscan extract`); missing, stale or
    damaged ones are an error naming them, and nothing is written into the shared store."""
    size = settings.size
    if kind == "2d":
        def image_loader(path: Path) -> Callable[[], tuple[np.ndarray, None]]:
            return lambda: (resize(load_image(path), (size, size)), None)

        for subject in subjects:  # fail on a corrupt image now, not after the model loaded
            load_image(subject.image)
        return Prepared(load=[image_loader(s.image) for s in subjects], info={"resized_to": [size, size]})

    from preprocessing.cohort import preprocess_cohort
    from preprocessing.template import find_template_folder

    folder = cache.store
    if compute:
        from preprocessing.store import mark_used

        result = preprocess_cohort([s.spec() for s in subjects], folder, settings, template=template, stale="recompute")
        mark_used(folder)
    else:  # read-only: the store is shared with other parts and runs
        result = require_extracted(subjects, settings, template, cache)
    loads = [lambda r=record: (r.load_image(), r.load_mask()) for record in result.records]
    return Prepared(
        load=loads,
        mappings=[record.load_mapping() for record in result.records],
        info={"cache": str(folder.resolve()), "preprocessed_now": len(result.computed),
              "template": str(find_template_folder(template).resolve()),
              "landmarks": str(Path(result.landmarks_path).resolve()),
              # Per subject: the brain extractor used and any warning (template fallback) for the report.
              "brain_mask": {r.id: r.brain_mask for r in result.records},
              "warnings": {r.id: list(r.warnings) for r in result.records if r.warnings}},
    )
