"""`volscan bids BIDS_DIR OUTPUT_DIR participant|group`: the BIDS-App entry point.

The two analysis levels of the BIDS-Apps convention map onto volscan's two stages:

- `participant`: the per-scan stage (`volscan extract`: preprocess + tokens into the cache) for
  the scans of the chosen participants (`--participant-label`; default all). The cohort is
  every scan of the suffix in the dataset, as the group level screens them all: its Nyúl
  landmarks are learned on every scan, so with learned landmarks a run for some participants
  goes stage by stage like `extract --part` (`--stage spatial` per participant, `landmarks` once,
  `tokens` per participant), or takes fixed landmarks from the config;
- `group`: the group stage (`volscan score`: mutual scoring, CoDeGraph, maps, report) over every
  scan, written as BIDS Derivatives (`pipelines.bids_derivatives`).

Both write OUTPUT_DIR's dataset_description.json; neither writes into the BIDS dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.bids import BidsSelection, bids_protected, bids_subjects, find_scans
from volumetric.errors import InputFileError, VolscanError

LEVELS = ("participant", "group")


def check_folders(bids_dir: Path, output_dir: Path) -> None:
    """Refuse an OUTPUT_DIR that is the dataset, holds it, or lies in a participant's folder
    (`<bids_dir>/derivatives/volscan` is fine), or holds another pipeline's dataset."""
    from pipelines.bids_derivatives import check_output_root

    out = output_dir.resolve()
    for item in (bids_dir.resolve(),) + tuple(p.resolve() for p in bids_protected(bids_dir)[1:]):
        if out == item or out in item.parents or item in out.parents and item != bids_dir.resolve():
            raise InputFileError(output_dir, f"output folder overlaps the BIDS input {item}; use e.g. "
                                             f"{bids_dir / 'derivatives' / 'volscan'}")
    check_output_root(output_dir)


def run_participant(bids_dir: str | Path, output_dir: str | Path, config: Any, selection: BidsSelection,
                    stage: str = "all", ray: Any = None) -> Any:
    """The per-scan stage for `selection`'s participants (module docstring); the
    `pipelines.distributed.extract.ExtractResult`."""
    from pipelines.bids_derivatives import write_description
    from pipelines.distributed.extract import ExtractSettings, extract_planned
    from pipelines.plan import build_plan, check_settings

    checked = check_settings(config)
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    check_folders(bids_dir, output_dir)
    cohort = BidsSelection(selection.suffix)
    chosen = frozenset(s.id for s in find_scans(bids_dir, selection)) if selection.participants else None
    # Settings left at their defaults (`checked.preprocess` None) learn the landmarks.
    learned = checked.preprocess is None or checked.preprocess.landmarks is None
    if chosen is not None and stage == "all" and learned:
        raise VolscanError(
            "participant level for some participants with learned Nyúl landmarks (learned on every scan) needs three "
            "steps: --stage spatial for each participant, then --stage landmarks once (no --participant-label), then "
            "--stage tokens for each participant; or run it without --participant-label, or fix the landmarks "
            "(config preprocess: {landmarks: FILE})"
        )
    subjects = bids_subjects(bids_dir, cohort, registered=config.registered, skull_stripped=config.skull_stripped)
    plan = build_plan(subjects, checked)  # subjects sorted by id (`find_scans`)
    result = extract_planned(plan, ExtractSettings(stage=stage, ray=ray, ids=chosen))
    write_description(output_dir, bids_dir)
    return result


def run_group(bids_dir: str | Path, output_dir: str | Path, config: Any, selection: BidsSelection,
              exports: Sequence[str] = ()) -> tuple[Any, list[Path]]:
    """The group stage over every scan of the suffix, from the cache the participant level
    filled, written as BIDS Derivatives; (the `ScreenResult` of the run in
    `OUTPUT_DIR/volscan/<suffix>`, the derivative files written)."""
    from pipelines.bids_derivatives import RUN_FOLDER, write_derivatives
    from pipelines.plan import check_settings
    from pipelines.screen import screen_subjects

    if selection.participants:
        raise VolscanError("the group level screens every participant of the dataset (the cohort the participant "
                           "level prepared); --participant-label belongs to the participant level")
    checked = check_settings(config)
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    check_folders(bids_dir, output_dir)
    scans = find_scans(bids_dir, selection)
    subjects = bids_subjects(bids_dir, selection, registered=config.registered, skull_stripped=config.skull_stripped)
    run_dir = output_dir / RUN_FOLDER / selection.suffix
    # force: the run folder is volscan's own, replaced by each group run (only a previous screen run is).
    result = screen_subjects(subjects, run_dir, checked, force=True, source=str(bids_dir.resolve()),
                             labels_given=False, compute=False, exports=exports)
    return result, write_derivatives(output_dir, bids_dir, scans, result.record, result.out_dir)
