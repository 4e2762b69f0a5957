"""Stage 1 of `volscan screen`: the output folder, the scans, their masks and every setting,
checked before any heavy work (see `pipelines.inputs` for the per-file checks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.inputs import Subject, discover_subjects
from pipelines.outputs import check_output_dir
from pipelines.screen_config import ScreenConfig
from pipelines.validation import CheckedScreen


def find_subjects(
    input_dir: str | Path, out_dir: str | Path, config: ScreenConfig, labels_dir: str | Path | None, force: bool,
    minimum: int = 2,
) -> list[Subject]:
    """The subjects of `input_dir` (masks from `labels_dir`; at least `minimum`), after refusing
    bad settings (`pipelines.validation.check_settings`: a typo is the first error) and a bad OUT."""
    from pipelines.validation import check_settings

    check_settings(config)  # cheap and repeated by `check_run`: here it comes before OUT and the inputs
    protected = (Path(input_dir),) + ((Path(labels_dir),) if labels_dir is not None else ())
    check_output_dir(out_dir, force, protected)  # refuse a bad OUT before reading any input
    subjects, _ = discover_subjects(
        input_dir, labels_dir, registered=config.registered, skull_stripped=config.skull_stripped, minimum=minimum
    )
    return subjects


def check_run(subjects: Sequence[Subject], config: ScreenConfig, reference_scans: int = 0) -> CheckedScreen:
    """The one validation pass (`pipelines.validation.validate_screen`: settings, subjects,
    cohort size (counting `reference_scans` of a `--reference` run), template, backbone built
    with its weights loaded), before minutes of preprocessing. Returns kind, device and the
    loaded backbone."""
    from pipelines.validation import validate_screen

    return validate_screen(subjects, config, reference_scans)
