"""Is the per-scan stage of a cohort done? The check `volscan score` makes before any work.

It reads only the small per-subject records of the preprocessing store, never a volume, so a
cohort of thousands is checked in seconds; the token cache is checked afterwards by
`pipelines.stages.tokens.extract_tokens(compute=False)` (which needs each standardised cube's
content hash).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.inputs import Subject
from pipelines.screen_config import ScreenConfig
from volumetric.errors import VolscanError


def missing_scans(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path) -> list[str]:
    """Ids (sorted) of the 3D `subjects` without a standardised cube in the cohort's store."""
    from pipelines.stages.preprocess import cohort_folder
    from preprocessing.store import read_record

    store = cohort_folder(subjects, config, cache_root)
    return sorted(s.id for s in subjects if not read_record(store, s.id).get("final_key"))


def require_extracted(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path, kind: str) -> None:
    """Raise one `VolscanError` naming the scans whose per-scan stage is missing (3D store check),
    with the failures `volscan extract` logged for them, if any."""
    from pipelines.distributed.error_log import read_error_logs
    from pipelines.distributed.extract import extract_folder

    missing = missing_scans(subjects, config, cache_root) if kind == "3d" else []
    if not missing:
        return
    logs = extract_folder(subjects, config, cache_root)
    logged = read_error_logs(logs)
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    failed = [sid for sid in missing if sid in logged]
    why = (f"; {len(failed)} of them failed (e.g. {failed[0]}: {logged[failed[0]]['error']}), see {logs}/*.jsonl"
           if failed else "; run volscan extract with the same settings first")
    raise VolscanError(f"the per-scan stage of {len(missing)} scan(s) is missing: {shown}{why}")
