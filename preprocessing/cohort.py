"""A cohort → files on disk (`preprocessing.store` layout) + one set of Nyúl landmarks; resumable.

Each subject runs the one-volume chain (`preprocessing.volume`) unless its record shows the
same input content and settings and every output still matches its checksum. Cubes (before
and after Nyúl) are stored as int16 with a NIfTI scale factor (`save_volume(scaled_int16=True)`:
half the bytes of float32, each value within 1/65534 of the cube's largest magnitude; the
scores' change is measured in docs/scale.md); then landmarks are
learned on the whole cohort (or the fixed `settings.landmarks` are applied) and every cube is
standardised. Damaged outputs (checksum mismatch, unreadable or non-monotone landmarks) are
rebuilt with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from preprocessing.brain_mask import MaskChoice
from preprocessing.intensity import Landmarks, learn_landmarks, standardize
from preprocessing.io import load_volume, save_volume, subject_id
from preprocessing.settings import PreprocessSettings
from preprocessing.store import (
    SubjectRecord,
    file_checksums,
    open_for_writing,
    read_record,
    subject_record,
    verified_files,
    write_record,
)
from preprocessing.template import Template, resolve_template
from preprocessing.volume import VolumePreprocessor
from volumetric.cache_keys import landmarks_key, scan_key, standardised_key
from volumetric.errors import InputFileError, VolscanError, first_line

log = logging.getLogger(__name__)

LANDMARKS_FILE = "landmarks.npy"


@dataclass(frozen=True)
class SubjectSpec:
    """One cohort input with optional per-subject overrides (None = the cohort-wide setting)."""

    path: Path
    registered: bool | None = None
    skull_stripped: bool | None = None
    id: str | None = None


@dataclass
class CohortResult:
    """Per-subject `records` (input order), the `landmarks` used and where they are saved;
    `computed`: ids whose spatial chain ran in this call (landmarks None after `until="spatial"`)."""

    records: list[SubjectRecord]
    landmarks: Landmarks | None
    landmarks_path: Path | None
    computed: list[str] = field(default_factory=list)


def preprocess_cohort(
    paths: Sequence[str | os.PathLike[str] | SubjectSpec],
    out_dir: str | os.PathLike[str],
    settings: PreprocessSettings = PreprocessSettings(),
    *,
    template: Template | str | os.PathLike[str] | None = None,
    force: bool = False,
    stale: Literal["error", "recompute"] = "error",
    workers: int = 1,
    progress: bool = True,
    until: Literal["spatial", "landmarks"] | None = None,
) -> CohortResult:
    """Preprocess every input into `out_dir` with `settings`; learn (or apply fixed) Nyúl landmarks.

    `until` stops early for the per-scan stage of `volscan extract` (pipelines.distributed):
    "spatial" after the spatial chain (landmarks and landmarks_path None), "landmarks" once the
    landmarks are learned (or applied) and saved, before standardising.

    Resumable: a subject whose record matches its input's content hash and the settings, with
    intact outputs, is skipped. Outputs made with other settings raise `VolscanError` unless
    `force` (recompute everything) or `stale="recompute"` (recompute what is stale; for cache
    folders). `workers` > 1 runs the spatial chain of several subjects in parallel processes.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise VolscanError(f"workers must be an integer >= 1, got {workers!r}")
    if stale not in ("error", "recompute"):
        raise VolscanError(f"stale must be 'error' or 'recompute', got {stale!r}")
    if not isinstance(settings, PreprocessSettings):
        raise VolscanError(f"settings must be a PreprocessSettings, got {type(settings).__name__}")
    out = Path(out_dir)
    specs = _specs(paths)
    fixed_landmarks = Landmarks.load(settings.landmarks) if settings.landmarks else None
    subjects = _subjects(specs, out, settings, template)
    records, todo = [s.record for s in subjects], []
    for subject in subjects:
        record = subject.record
        done = read_record(out, record.id)
        if not force and done.get("spatial_key") == subject.key:
            if verified_files(out, record.spatial_files, done.get("spatial_files")):
                continue
        elif not force and stale == "error" and done.get("spatial_key") is not None:
            raise _stale_error(out / "records" / f"{record.id}.json")
        todo.append((subject.pre, record, {"spatial_key": subject.key, "settings": subject.settings_key,
                                           "mask": _mask_entry(subject.choice)}))
    open_for_writing(out)
    computed = _run_spatial(todo, out, workers, progress)
    if until == "spatial":
        return CohortResult(records=records, landmarks=None, landmarks_path=None, computed=computed)

    landmarks, landmarks_path = _cohort_landmarks(out, subjects, fixed_landmarks, settings.cutoff, force, stale)
    if until == "landmarks":
        return CohortResult(records=records, landmarks=landmarks, landmarks_path=landmarks_path, computed=computed)
    for subject in tqdm(subjects, desc="standardise", unit="vol", disable=not progress):
        record, final_key = subject.record, standardised_key(subject.key, landmarks.digest)
        done = read_record(out, record.id)
        if not force and done.get("final_key") == final_key:
            if verified_files(out, (record.image_path,), done.get("final_files")):
                continue
        elif not force and stale == "error" and done.get("final_key") is not None:
            raise _stale_error(record.image_path)
        cube = load_volume(record.spatial_path)
        standardised = standardize(cube.array, load_volume(record.mask_path).array > 0, landmarks)
        save_volume(standardised, cube.affine, record.image_path, scaled_int16=True)
        final = {"final_key": final_key, "final_files": file_checksums(out, (record.image_path,))}
        write_record(out, record.id, {**done, **final})
    return CohortResult(records=records, landmarks=landmarks, landmarks_path=landmarks_path, computed=computed)


@dataclass(frozen=True)
class StoreCheck:
    """What `check_store` found: `result` (the store as it stands; `landmarks` None when unusable),
    `scans`: {id: problem} for every subject whose outputs are missing, stale or damaged, and
    `landmarks`: the problem of the cohort's landmarks, or None. Complete when both are empty."""

    result: CohortResult
    scans: dict[str, str]
    landmarks: str | None

    @property
    def complete(self) -> bool:
        """True when every subject's standardised cube is current and intact."""
        return not self.scans and self.landmarks is None


def check_store(
    paths: Sequence[str | os.PathLike[str] | SubjectSpec],
    out_dir: str | os.PathLike[str],
    settings: PreprocessSettings = PreprocessSettings(),
    *,
    template: Template | str | os.PathLike[str] | None = None,
) -> StoreCheck:
    """Read-only `preprocess_cohort`: is every subject's standardised cube in `out_dir` current
    (same input content, settings and landmarks) and intact? Writes nothing, computes nothing:
    for `volscan score`, which must never rewrite a store other runs share.

    Learned landmarks must have been learned on the subjects' current spatial outputs; fixed
    ones (`settings.landmarks`) must be the stored ones."""
    out = Path(out_dir)
    subjects = _subjects(_specs(paths), out, settings, template)
    scans: dict[str, str] = {}
    records = {s.record.id: read_record(out, s.record.id, rebuild=False) for s in subjects}
    for subject in subjects:
        done = records[subject.record.id]
        if done.get("spatial_key") != subject.key:
            scans[subject.record.id] = ("record damaged" if done.get("corrupt")
                                        else "not preprocessed" if not done.get("spatial_key")
                                        else _what_changed(done.get("settings"), subject.settings_key))
        elif not verified_files(out, subject.record.spatial_files, done.get("spatial_files"), rebuild=False):
            scans[subject.record.id] = "preprocessed files damaged"
    path = out / LANDMARKS_FILE
    landmarks, info = _stored_landmarks(path, rebuild=False)
    problem = None
    if landmarks is None:
        problem = "not learned yet"
    elif settings.landmarks:
        if Landmarks.load(settings.landmarks).digest != landmarks.digest:
            problem = f"not the fixed landmarks {settings.landmarks}"
    elif info.get("cohort_key") != landmarks_key(((s.record.id, s.key) for s in subjects), settings.cutoff):
        learned_on = info.get("spatial")
        changed = sorted(s.record.id for s in subjects if not isinstance(learned_on, dict)
                         or learned_on.get(s.record.id) != s.key)
        problem = (f"learned before {', '.join(changed[:5])}{' and others' if len(changed) > 5 else ''} "
                   "was preprocessed again" if changed and isinstance(learned_on, dict)
                   else "learned on other scans or settings")
    if problem is None:
        for subject in subjects:
            done = records[subject.record.id]
            if subject.record.id in scans:
                continue
            if done.get("final_key") != standardised_key(subject.key, landmarks.digest):
                scans[subject.record.id] = ("not standardised" if not done.get("final_key")
                                            else "standardised with other landmarks")
            elif not verified_files(out, (subject.record.image_path,), done.get("final_files"), rebuild=False):
                scans[subject.record.id] = f"standardised cube {subject.record.image_path.relative_to(out)} damaged"
    result = CohortResult(records=[s.record for s in subjects], landmarks=None if problem else landmarks,
                          landmarks_path=path)
    return StoreCheck(result, scans, problem)


@dataclass(frozen=True)
class _Subject:
    """One subject of a cohort run: its preprocessor, brain-mask choice, record paths and spatial key."""

    pre: VolumePreprocessor
    choice: MaskChoice
    record: SubjectRecord
    key: str
    settings_key: dict


def _specs(paths: Sequence[str | os.PathLike[str] | SubjectSpec]) -> list[SubjectSpec]:
    """`paths` as specs with their subject ids set; refuses an empty list and shared ids."""
    specs = [p if isinstance(p, SubjectSpec) else SubjectSpec(Path(p)) for p in paths]
    if not specs:
        raise VolscanError("no input volumes given")
    specs = [SubjectSpec(s.path, s.registered, s.skull_stripped, s.id or subject_id(s.path)) for s in specs]
    ids = [spec.id for spec in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise VolscanError(f"several inputs share the subject id(s) {', '.join(duplicates)}; rename them")
    return specs


def _subjects(specs: list[SubjectSpec], out: Path, settings: PreprocessSettings,
              template: Template | str | os.PathLike[str] | None) -> list[_Subject]:
    """Each spec's preprocessor (per-subject registered / skull-stripped flags), record and spatial
    key (input content hash + every spatial setting)."""
    if not isinstance(template, Template):
        template = resolve_template(template)
    preprocessors: dict[tuple[bool, bool], VolumePreprocessor] = {}
    subjects = []
    for spec in specs:
        reg = settings.registered if spec.registered is None else spec.registered
        stripped = settings.skull_stripped if spec.skull_stripped is None else spec.skull_stripped
        if (reg, stripped) not in preprocessors:
            preprocessors[reg, stripped] = VolumePreprocessor(
                settings.replace(registered=reg, skull_stripped=stripped), template
            )
        pre = preprocessors[reg, stripped]
        choice = pre.mask_choice(spec.path)
        record = subject_record(out, spec.id, spec.path, choice.method, (choice.warning,) if choice.warning else ())
        settings_key = pre.settings_key(spec.path)
        subjects.append(_Subject(pre, choice, record, scan_key(spec.path, settings_key), settings_key))
    return subjects


def _mask_entry(choice: MaskChoice) -> dict:
    return {"method": choice.method, "contrast": choice.contrast, "warning": choice.warning}


def _run_spatial(todo: list[tuple[VolumePreprocessor, SubjectRecord, dict]], out: Path, workers: int, progress: bool) -> list[str]:
    """Run the spatial chain for `todo` (in `workers` processes when > 1); returns the ids done."""
    bar = tqdm(total=len(todo), desc="preprocess", unit="vol", disable=not progress)
    computed = []

    def finish(record: SubjectRecord, entry: dict, failure: tuple[str, str] | None) -> None:
        if failure is not None:
            # Exceptions with custom constructors do not survive pickling; rebuild them here.
            path, problem = failure
            raise InputFileError(path, problem) if path else VolscanError(problem)
        files = file_checksums(out, record.spatial_files)
        write_record(out, record.id, {"source": str(record.source), **entry, "spatial_files": files, "final_key": None})
        computed.append(record.id)
        bar.set_postfix_str(record.id)
        bar.update()

    with bar:
        if workers <= 1 or len(todo) <= 1:
            for pre, record, entry in todo:
                finish(record, entry, _spatial_job(pre, record))
            return computed
        # "spawn": a clean interpreter per worker; forking a process that already runs ITK and
        # torch thread pools is not guaranteed to be safe.
        context = multiprocessing.get_context("spawn")
        # Each worker receives the preprocessors once, so its prepared template (`_fixed`, the
        # template cube mask) is built once per worker rather than once per subject.
        distinct = list({id(pre): pre for pre, _, _ in todo}.values())
        index = {id(pre): i for i, pre in enumerate(distinct)}
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(distinct,)
        ) as pool:
            futures = {pool.submit(_worker_job, index[id(pre)], record): (record, entry) for pre, record, entry in todo}
            try:
                for future in as_completed(futures):
                    finish(*futures[future], future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    order = {record.id: i for i, (_, record, _) in enumerate(todo)}
    return sorted(computed, key=order.__getitem__)


_worker_preprocessors: list[VolumePreprocessor] = []


def _init_worker(preprocessors: list[VolumePreprocessor]) -> None:
    _worker_preprocessors[:] = preprocessors


def _worker_job(index: int, record: SubjectRecord) -> tuple[str, str] | None:
    return _spatial_job(_worker_preprocessors[index], record)


def _spatial_job(pre: VolumePreprocessor, record: SubjectRecord) -> tuple[str, str] | None:
    """Preprocess one subject and write its spatial outputs; a bad input comes back as (path, problem)."""
    try:
        result = pre(record.source)
    except InputFileError as exc:
        return exc.path, exc.problem
    except VolscanError as exc:
        return "", str(exc)
    except RuntimeError as exc:  # SimpleITK's and torch's (brain masks) failure on this scan: one line naming it
        if isinstance(exc, (NotImplementedError, RecursionError)):
            raise  # volscan's own bug, not the scan's: it surfaces with its traceback
        log.debug("preprocessing %s failed", record.source, exc_info=True)
        return str(record.source), f"preprocessing failed: {_library_error(exc)} (details: -vv)"
    save_volume(result.cube, result.mapping.cube_affine, record.spatial_path, scaled_int16=True)
    save_volume(result.brain_mask, result.mapping.cube_affine, record.mask_path, dtype=np.uint8)
    result.mapping.save(record.mapping_path)
    result.mapping.write_itk_transform(record.transform_path)
    return None


def _library_error(exc: Exception) -> str:
    """One line for a third-party failure: ITK's own 'ITK ERROR' line when there is one (the first
    line of a SimpleITK exception is only a source location), else the first line."""
    for line in str(exc).splitlines():
        if "ITK ERROR:" in line:
            return re.sub(r"\(0x[0-9a-fA-F]+\)", "", line.split("ITK ERROR:", 1)[1]).strip()
    return first_line(exc)


def _cohort_landmarks(
    out: Path,
    subjects: list[_Subject],
    given: Landmarks | None,
    cutoff: tuple[float, float],
    force: bool,
    stale: str,
) -> tuple[Landmarks, Path]:
    """Fixed landmarks (copied into `out`) or the cohort's learned ones (reused when intact and current)."""
    path = out / LANDMARKS_FILE
    stored, info = _stored_landmarks(path)
    if given is not None:
        if stored is None or stored.digest != given.digest:
            if stored is not None and not force and stale == "error":
                raise _stale_error(path)
            given.save(path, extra={"digest": given.digest})
        return given, path
    cohort_key = landmarks_key(((s.record.id, s.key) for s in subjects), cutoff)
    if stored is not None and not force:
        if info.get("cohort_key") == cohort_key:
            return stored, path
        if stale == "error":
            raise VolscanError(
                f"{path}: learned on a different cohort or settings; pass --force to relearn, "
                "or --landmarks FILE to reuse fixed landmarks"
            )
    records = [s.record for s in subjects]
    pairs = ((load_volume(r.spatial_path).array, load_volume(r.mask_path).array > 0) for r in records)
    learned = learn_landmarks(tqdm(pairs, total=len(records), desc="landmarks", leave=False), cutoff)
    # The spatial key each subject had: `check_store` names the scans preprocessed again since.
    learned.save(path, extra={"cohort_key": cohort_key, "subjects": len(records), "digest": learned.digest,
                              "spatial": {s.record.id: s.key for s in subjects}})
    return learned, path


def _stored_landmarks(path: Path, *, rebuild: bool = True) -> tuple[Landmarks | None, dict]:
    """The landmarks stored at `path` and their sidecar, or (None, {}) when absent or damaged
    (warning; `rebuild`: saying they are rebuilt)."""
    sidecar = path.with_suffix(".json")
    if not path.exists() and not sidecar.exists():
        return None, {}
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        landmarks = Landmarks.load(path)
        intact = isinstance(info, dict) and info.get("digest") == landmarks.digest
    except (OSError, ValueError, InputFileError, VolscanError):
        intact = False
    if not intact:
        log.warning("%s: stored landmarks are corrupt or were changed (checksum mismatch)%s", path,
                    "; rebuilding them" if rebuild else "")
        return None, {}
    return landmarks, info


def _what_changed(stored: Any, requested: dict[str, Any]) -> str:
    """Why a stored spatial output is stale, naming the settings that differ, e.g. "preprocessed
    with other settings (bias_correction: n4 in the store, none requested)"."""
    requested = json.loads(json.dumps(requested, default=str))  # as stored: tuples are lists there
    if stored == requested:
        return "preprocessed from other input content"
    if not isinstance(stored, dict):
        return "preprocessed with other settings"
    # Without N4 the key has no bias_correction / n4 entries (`PreprocessSettings.spatial_key`).
    stored, requested = {"bias_correction": "none", **stored}, {"bias_correction": "none", **requested}
    n4_switched = stored["bias_correction"] != requested["bias_correction"]
    changed = []
    for name in sorted(set(stored) | set(requested)):
        old, new = stored.get(name), requested.get(name)
        if old == new or (name == "n4" and n4_switched):
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # a nested table: its entries that differ
            changed += [(f"{name}.{key}", old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
                        if old.get(key) != new.get(key)]
        else:
            changed.append((name, old, new))
    return "preprocessed with other settings (" + "; ".join(
        f"{name}: {old} in the store, {new} requested" for name, old, new in changed) + ")"


def _stale_error(path: Path) -> VolscanError:
    return VolscanError(
        f"{path}: existing output made from other inputs or settings; "
        "pass --force to overwrite or choose another output folder"
    )
