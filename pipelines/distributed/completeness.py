"""Is the per-scan stage of a cohort done? The checks `volscan score` makes before it reads the cache.

`volscan score` computes nothing per scan and writes nothing into the shared caches (other
parts or runs rely on them): a scan whose store entry is missing, stale or damaged is an error
naming it and the `volscan extract` command that redoes it. The quick check reads only the
small per-subject records; the full one (`preprocessing.cohort.check_store`) hashes the inputs
and the stored files like a resumed `preprocess_cohort`, without writing. The token cache is
checked afterwards by `pipelines.stages.tokens.extract_tokens(compute=False)` (which needs each
standardised cube's content hash).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.failures import shown
from pipelines.inputs import Subject
from pipelines.screen_config import ScreenConfig
from volumetric.errors import VolscanError


def missing_scans(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path) -> list[str]:
    """Ids (sorted) of the 3D `subjects` without a standardised cube in the cohort's store."""
    from pipelines.stages.preprocess import cohort_folder
    from preprocessing.store import read_record

    store = cohort_folder(subjects, config, cache_root)
    return sorted(s.id for s in subjects if not read_record(store, s.id, rebuild=False).get("final_key"))


def extract_command(subjects: Sequence[Subject], cache_root: Path, stage: str = "") -> str:
    """The `volscan extract` command line that (re)builds this cohort's per-scan stage (same settings)."""
    folders = {s.image.parent for s in subjects}
    source = str(folders.pop()) if len(folders) == 1 else "INPUT"
    return f"'volscan extract {source} --cache {cache_root}{f' --stage {stage}' if stage else ''}' (same settings)"


def require_extracted(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path) -> Any:
    """The 3D cohort's store (`preprocessing.cohort.CohortResult`) when every scan's standardised
    cube is there, current and intact; otherwise one `VolscanError` naming the scans (with the
    failures `volscan extract` logged for them, if any) and the command to run. Writes nothing."""
    from pipelines.distributed.error_log import read_error_logs
    from pipelines.distributed.extract import extract_folder
    from pipelines.distributed.per_scan import spec_of
    from pipelines.stages.preprocess import cohort_folder
    from preprocessing.cohort import check_store

    missing = missing_scans(subjects, config, cache_root)
    if missing:
        logs = extract_folder(subjects, config, cache_root)
        logged = read_error_logs(logs)
        failed = [sid for sid in missing if sid in logged]
        why = (f"; {len(failed)} of them failed (e.g. {failed[0]}: {logged[failed[0]]['error']}), see {logs}/*.jsonl"
               if failed else f"; run {extract_command(subjects, cache_root)} first")
        raise VolscanError(f"the per-scan stage of {len(missing)} scan(s) is missing: {shown(missing)}{why}")
    store = cohort_folder(subjects, config, cache_root)
    check = check_store([spec_of(s) for s in subjects], store, config.preprocess_settings(), template=config.template)
    if check.scans:  # spatial problems first: relearning landmarks needs every spatial output
        stale = sorted(check.scans)
        listed = shown([f"{sid} ({check.scans[sid]})" for sid in stale])
        raise VolscanError(f"the per-scan stage of {len(stale)} scan(s) in {store} is stale or damaged: {listed}; "
                           f"run {extract_command(subjects, cache_root)} to redo them")
    if check.landmarks is not None:
        learned = not config.preprocess_settings().landmarks  # fixed landmarks have no stage of their own
        raise VolscanError(
            f"{check.result.landmarks_path}: the cohort's Nyúl landmarks are {check.landmarks}; run "
            + (f"{extract_command(subjects, cache_root, 'landmarks')}, then --stage tokens for every part"
               if learned else extract_command(subjects, cache_root))
        )
    return check.result

