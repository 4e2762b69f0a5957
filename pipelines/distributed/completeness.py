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
from typing import TYPE_CHECKING, Any

from pipelines.cache_locations import CacheLocations
from pipelines.distributed.error_log import read_error_logs
from pipelines.failures import shown
from pipelines.subjects import Subject
from volumetric.errors import VolscanError

if TYPE_CHECKING:
    from preprocessing.settings import PreprocessSettings


def missing_scans(subjects: Sequence[Subject], store: Path) -> list[str]:
    """Ids (sorted) of the 3D `subjects` without a standardised cube in the cohort's `store`."""
    from preprocessing.store import read_record

    return sorted(s.id for s in subjects if not read_record(store, s.id, rebuild=False).get("final_key"))


def extract_command(subjects: Sequence[Subject], cache_root: Path, stage: str = "") -> str:
    """The `volscan extract` command line that (re)builds this cohort's per-scan stage (same settings)."""
    folders = {s.image.parent for s in subjects}
    source = str(folders.pop()) if len(folders) == 1 else "INPUT"
    return f"'volscan extract {source} --cache {cache_root}{f' --stage {stage}' if stage else ''}' (same settings)"


def require_extracted(subjects: Sequence[Subject], settings: "PreprocessSettings", template: str | None,
                      cache: CacheLocations) -> Any:
    """The 3D cohort's store `cache.store` (`preprocessing.cohort.CohortResult`) when every scan's
    standardised cube is there, current and intact; otherwise one `VolscanError` naming the scans
    (with the failures `volscan extract` logged for them, if any) and the command to run. Writes nothing."""
    from preprocessing.cohort import check_store

    missing = missing_scans(subjects, cache.store)
    if missing:
        logged = read_error_logs(cache.extract_logs)
        failed = [sid for sid in missing if sid in logged]
        why = (f"; {len(failed)} of them failed (e.g. {failed[0]}: {logged[failed[0]]['error']}), "
               f"see {cache.extract_logs}/*.jsonl" if failed else f"; run {extract_command(subjects, cache.root)} first")
        raise VolscanError(f"the per-scan stage of {len(missing)} scan(s) is missing: {shown(missing)}{why}")
    check = check_store([s.spec() for s in subjects], cache.store, settings, template=template)
    if check.scans:  # spatial problems first: relearning landmarks needs every spatial output
        stale = sorted(check.scans)
        listed = shown([f"{sid} ({check.scans[sid]})" for sid in stale])
        raise VolscanError(f"the per-scan stage of {len(stale)} scan(s) in {cache.store} is stale or damaged: "
                           f"{listed}; run {extract_command(subjects, cache.root)} to redo them")
    if check.landmarks is not None:
        learned = not settings.landmarks  # fixed landmarks have no stage of their own
        raise VolscanError(
            f"{check.result.landmarks_path}: the cohort's Nyúl landmarks are {check.landmarks}; run "
            + (f"{extract_command(subjects, cache.root, 'landmarks')}, then --stage tokens for every part"
               if learned else extract_command(subjects, cache.root))
        )
    return check.result
