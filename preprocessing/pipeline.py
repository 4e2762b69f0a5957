"""The whole chain: one volume → cube + brain mask + mapping; a cohort → files on disk + Nyúl.

Spatial steps are composed into a single resampling (registration ∘ crop box ∘ resize), so each
input is interpolated once. Registered mode skips only the registration: the crop box still
comes from the template's brain, so it needs the template too (a clear error without one;
using the input's full grid instead would break spatial correspondence with other cohorts).

Cohort output layout (`preprocess_cohort`, resumable; see docs/preprocessing.md):
`images/<id>.nii.gz` (standardised cube), `masks/<id>.nii.gz`, `mappings/<id>.json`,
`transforms/<id>.tfm`, `spatial/<id>.nii.gz` (cube before Nyúl), `records/<id>.json`,
`landmarks.npy` (+ `.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from preprocessing.brain_mask import choose_mask_method, hdbet_mask, nonzero_mask, refine_template_mask
from preprocessing.crop_resize import brain_crop_box, check_cube_size, crop_and_resize, cube_affine
from preprocessing.intensity import DEFAULT_CUTOFF, Landmarks, learn_landmarks, standardize
from preprocessing.io import Volume, load_volume, save_volume, subject_id
from volumetric.atomic_files import atomic_write_bytes
from preprocessing.native_mapping import NativeMapping
from preprocessing.registration import RegistrationSettings, prepare_image, register_affine
from preprocessing.template import Template, resolve_template
from volumetric.errors import InputFileError, VolscanError

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1


@dataclass(frozen=True)
class SpatialResult:
    """`cube` (S, S, S) float32 input intensities, `brain_mask` (S, S, S) bool, `mapping` back and forth."""

    cube: np.ndarray
    brain_mask: np.ndarray
    mapping: NativeMapping


class VolumePreprocessor:
    """Register to the template (unless `registered`), brain-mask, crop the template's brain box, resize to S³.

    `template`: a `Template`, a template folder, or None (resolved by `resolve_template`).
    `mask_method`: "auto" (nonzero if `skull_stripped`, else template), "nonzero", "template", "hd-bet".
    `margin_mm`, `cubic`: crop box (see `crop_resize`); `background_scale`: mask refinement.
    """

    def __init__(
        self,
        template: Template | str | os.PathLike[str] | None = None,
        size: int = 224,
        registered: bool = False,
        skull_stripped: bool = False,
        mask_method: str = "auto",
        *,
        margin_mm: float = 4.0,
        cubic: bool = False,
        background_scale: float = 0.5,
        registration: RegistrationSettings = RegistrationSettings(),
    ) -> None:
        self.template = template if isinstance(template, Template) else resolve_template(template)
        self.size = check_cube_size(size)
        self.registered = bool(registered)
        self.skull_stripped = bool(skull_stripped)
        self.mask_method = choose_mask_method(mask_method, self.skull_stripped)
        self.margin_mm = float(margin_mm)
        self.cubic = bool(cubic)
        self.background_scale = float(background_scale)
        if not (np.isfinite(self.margin_mm) and self.margin_mm >= 0):
            raise VolscanError(f"crop margin_mm must be >= 0, got {margin_mm!r}")
        if not (np.isfinite(self.background_scale) and self.background_scale >= 0):
            raise VolscanError(f"mask background_scale must be >= 0, got {background_scale!r}")
        self.registration = registration
        self.box = brain_crop_box(self.template.brain_mask, self.template.image.affine, self.margin_mm, self.cubic)
        self.cube_affine = cube_affine(self.box, self.size)
        self._template_cube_mask: np.ndarray | None = None
        self._fixed_image: sitk.Image | None = None

    def settings_key(self) -> dict:
        """Every setting that changes the output (JSON-able; part of cache keys)."""
        return {
            "version": PIPELINE_VERSION,
            "template": self.template.identity,
            "size": self.size,
            "registered": self.registered,
            "skull_stripped": self.skull_stripped,
            "mask_method": self.mask_method,
            "margin_mm": self.margin_mm,
            "cubic": self.cubic,
            "background_scale": self.background_scale,
            "registration": None if self.registered else self.registration.key(),
        }

    def __call__(self, volume: Volume | str | os.PathLike[str]) -> SpatialResult:
        """Preprocess one volume (or a path to one) into the cube; see `SpatialResult`."""
        if not isinstance(volume, Volume):
            volume = load_volume(volume)
        name = volume.path if volume.path is not None else "volume"
        if float(volume.array.min()) == float(volume.array.max()):
            raise InputFileError(name, f"has one constant intensity ({volume.array.flat[0]:g}) and no content")
        if self.registered:
            world = np.eye(4)
        else:
            moving = prepare_image(volume.array, volume.affine, self.registration)
            world = register_affine(moving, self._fixed(), self.registration)
        mapping = NativeMapping(
            native_shape=tuple(int(s) for s in volume.array.shape),
            native_affine=volume.affine,
            size=self.size,
            cube_affine=self.cube_affine,
            template_to_native=world,
        )
        cube = mapping.to_cube(volume.array, order=1)
        mask = self._brain_mask(volume, cube, mapping)
        if not mask.any():
            hint = " (is it really in template space?)" if self.registered else ""
            raise InputFileError(name, f"brain mask is empty inside the template's crop box{hint}")
        return SpatialResult(cube=cube, brain_mask=mask, mapping=mapping)

    def _fixed(self) -> sitk.Image:
        # Skull-stripped input registers to the skull-stripped template: like with like.
        if self._fixed_image is None:
            fixed = self.template.brain if self.skull_stripped else self.template.image.array
            self._fixed_image = prepare_image(fixed, self.template.image.affine, self.registration)
        return self._fixed_image

    def _brain_mask(self, volume: Volume, cube: np.ndarray, mapping: NativeMapping) -> np.ndarray:
        if self.mask_method == "nonzero":
            return mapping.to_cube(nonzero_mask(volume.array), order=0)
        if self.mask_method == "hd-bet":
            if volume.path is None or volume.path.is_dir():
                raise VolscanError("the hd-bet mask method needs a NIfTI file on disk")
            native_mask, affine = hdbet_mask(volume.path)
            if native_mask.shape != volume.array.shape or not np.allclose(affine, volume.affine, atol=1e-3):
                raise InputFileError(volume.path, "HD-BET returned a mask on a different grid")
            return mapping.to_cube(native_mask, order=0)
        return refine_template_mask(cube, self.template_cube_mask(), self.background_scale)

    def template_cube_mask(self) -> np.ndarray:
        """The template's brain mask in the cube, (S, S, S) bool (computed once)."""
        if self._template_cube_mask is None:
            self._template_cube_mask = crop_and_resize(
                self.template.brain_mask, self.template.image.affine, self.box, self.size, order=0
            )
        return self._template_cube_mask


# ----------------------------------------------------------------------------------------------
# Cohort runs


@dataclass(frozen=True)
class SubjectSpec:
    """One cohort input with optional per-subject overrides (None = the cohort-wide setting)."""

    path: Path
    registered: bool | None = None
    skull_stripped: bool | None = None
    id: str | None = None


@dataclass(frozen=True)
class SubjectRecord:
    """Where one subject's outputs are: cube `image_path`, `mask_path`, `mapping_path`, ITK `transform_path`."""

    id: str
    source: Path
    image_path: Path
    mask_path: Path
    mapping_path: Path
    transform_path: Path
    spatial_path: Path

    def load_image(self) -> np.ndarray:
        """Standardised cube (S, S, S) float32 (0 outside the brain)."""
        return load_volume(self.image_path).array

    def load_mask(self) -> np.ndarray:
        """Brain mask (S, S, S) bool."""
        return load_volume(self.mask_path).array > 0

    def load_mapping(self) -> NativeMapping:
        """The subject's `NativeMapping` (cube ↔ input grid)."""
        return NativeMapping.load(self.mapping_path)


@dataclass
class CohortResult:
    """Per-subject `records` (input order), the `landmarks` used and where they are saved."""

    records: list[SubjectRecord]
    landmarks: Landmarks
    landmarks_path: Path
    computed: list[str] = field(default_factory=list)


def preprocess_cohort(
    paths: Sequence[str | os.PathLike[str] | SubjectSpec],
    out_dir: str | os.PathLike[str],
    *,
    template: Template | str | os.PathLike[str] | None = None,
    size: int = 224,
    registered: bool = False,
    skull_stripped: bool = False,
    mask_method: str = "auto",
    landmarks: Landmarks | str | os.PathLike[str] | None = None,
    cutoff: tuple[float, float] = DEFAULT_CUTOFF,
    force: bool = False,
    stale: Literal["error", "recompute"] = "error",
    registration: RegistrationSettings = RegistrationSettings(),
    workers: int = 1,
    progress: bool = True,
) -> CohortResult:
    """Preprocess every input into `out_dir`; learn (or reuse) Nyúl landmarks; standardise.

    Resumable: a subject whose record matches its input's content hash and the settings is
    skipped. Outputs made with other settings raise `VolscanError` unless `force` (recompute
    everything) or `stale="recompute"` (recompute what is stale; for cache folders).
    `workers` > 1 runs the spatial chain of several subjects in parallel processes (registration
    itself is single-threaded for bit-identical reruns).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise VolscanError(f"workers must be an integer >= 1, got {workers!r}")
    if stale not in ("error", "recompute"):
        raise VolscanError(f"stale must be 'error' or 'recompute', got {stale!r}")
    out = Path(out_dir)
    specs = [p if isinstance(p, SubjectSpec) else SubjectSpec(Path(p)) for p in paths]
    if not specs:
        raise VolscanError("no input volumes given")
    ids = [spec.id or subject_id(spec.path) for spec in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise VolscanError(f"several inputs share the subject id(s) {', '.join(duplicates)}; rename them")
    if not isinstance(template, Template):
        template = resolve_template(template)
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = Landmarks.load(landmarks)
    preprocessors: dict[tuple[bool, bool], VolumePreprocessor] = {}

    def preprocessor(reg: bool, stripped: bool) -> VolumePreprocessor:
        if (reg, stripped) not in preprocessors:
            preprocessors[reg, stripped] = VolumePreprocessor(
                template, size, reg, stripped, mask_method, registration=registration
            )
        return preprocessors[reg, stripped]

    records, spatial_keys, todo = [], [], []
    for sid, spec in zip(ids, specs):
        reg = registered if spec.registered is None else spec.registered
        stripped = skull_stripped if spec.skull_stripped is None else spec.skull_stripped
        pre = preprocessor(reg, stripped)
        record = _record(out, sid, spec.path)
        key = _digest({"input": _content_hash(spec.path), "settings": pre.settings_key()})
        spatial_keys.append(key)
        records.append(record)
        done = _read_record(out, sid)
        outputs = (record.spatial_path, record.mask_path, record.mapping_path, record.transform_path)
        if not force and done.get("spatial_key") == key and all(p.exists() for p in outputs):
            continue
        if not force and stale == "error" and done.get("spatial_key") not in (None, key):
            raise _stale_error(out / "records" / f"{sid}.json")
        todo.append((pre, record, key))
    computed = _run_spatial(todo, out, workers, progress)

    landmarks, landmarks_path = _cohort_landmarks(out, records, spatial_keys, landmarks, cutoff, force, stale)
    for record, key in tqdm(list(zip(records, spatial_keys)), desc="standardise", unit="vol", disable=not progress):
        final_key = _digest({"spatial": key, "landmarks": landmarks.digest})
        done = _read_record(out, record.id)
        if not force and done.get("final_key") == final_key and record.image_path.exists():
            continue
        if not force and stale == "error" and done.get("final_key") not in (None, final_key):
            raise _stale_error(record.image_path)
        cube = load_volume(record.spatial_path)
        standardised = standardize(cube.array, load_volume(record.mask_path).array > 0, landmarks)
        save_volume(standardised, cube.affine, record.image_path, dtype=np.float32)
        _write_record(out, record.id, {**done, "final_key": final_key})
    return CohortResult(records=records, landmarks=landmarks, landmarks_path=landmarks_path, computed=computed)


def _run_spatial(
    todo: list[tuple[VolumePreprocessor, SubjectRecord, str]], out: Path, workers: int, progress: bool
) -> list[str]:
    """Run the spatial chain for `todo` (in `workers` processes when > 1); returns the ids done."""
    bar = tqdm(total=len(todo), desc="preprocess", unit="vol", disable=not progress)
    computed = []

    def finish(record: SubjectRecord, key: str, failure: tuple[str, str] | None) -> None:
        if failure is not None:
            # Exceptions with custom constructors do not survive pickling; rebuild them here.
            path, problem = failure
            raise InputFileError(path, problem) if path else VolscanError(problem)
        _write_record(out, record.id, {"source": str(record.source), "spatial_key": key, "final_key": None})
        computed.append(record.id)
        bar.set_postfix_str(record.id)
        bar.update()

    with bar:
        if workers <= 1 or len(todo) <= 1:
            for pre, record, key in todo:
                finish(record, key, _spatial_job(pre, record))
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
            futures = {pool.submit(_worker_job, index[id(pre)], record): (record, key) for pre, record, key in todo}
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
    save_volume(result.cube, result.mapping.cube_affine, record.spatial_path, dtype=np.float32)
    save_volume(result.brain_mask, result.mapping.cube_affine, record.mask_path, dtype=np.uint8)
    result.mapping.save(record.mapping_path)
    result.mapping.write_itk_transform(record.transform_path)
    return None


def _cohort_landmarks(
    out: Path,
    records: list[SubjectRecord],
    spatial_keys: list[str],
    given: Landmarks | None,
    cutoff: tuple[float, float],
    force: bool,
    stale: str,
) -> tuple[Landmarks, Path]:
    path = out / "landmarks.npy"
    if given is not None:
        existing = Landmarks.load(path).digest if path.exists() else None
        if existing != given.digest:
            if existing is not None and not force and stale == "error":
                raise _stale_error(path)
            given.save(path)
        return given, path
    cohort_key = _digest({"subjects": sorted(zip([r.id for r in records], spatial_keys)), "cutoff": list(cutoff)})
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and not force:
        if json.loads(sidecar.read_text(encoding="utf-8")).get("cohort_key") == cohort_key:
            return Landmarks.load(path), path
        if stale == "error":
            raise VolscanError(
                f"{path}: learned on a different cohort or settings; pass --force to relearn, "
                "or --landmarks FILE to reuse fixed landmarks"
            )
    pairs = ((load_volume(r.spatial_path).array, load_volume(r.mask_path).array > 0) for r in records)
    learned = learn_landmarks(tqdm(pairs, total=len(records), desc="landmarks", leave=False), cutoff)
    learned.save(path, extra={"cohort_key": cohort_key, "subjects": len(records)})
    return learned, path


def _stale_error(path: Path) -> VolscanError:
    return VolscanError(
        f"{path}: existing output made from other inputs or settings; "
        "pass --force to overwrite or choose another output folder"
    )


def _record(out: Path, sid: str, source: Path) -> SubjectRecord:
    return SubjectRecord(
        id=sid,
        source=source,
        image_path=out / "images" / f"{sid}.nii.gz",
        mask_path=out / "masks" / f"{sid}.nii.gz",
        mapping_path=out / "mappings" / f"{sid}.json",
        transform_path=out / "transforms" / f"{sid}.tfm",
        spatial_path=out / "spatial" / f"{sid}.nii.gz",
    )


def _read_record(out: Path, sid: str) -> dict:
    path = out / "records" / f"{sid}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s is unreadable; recomputing that subject", path)
        return {"corrupt": True}


def _write_record(out: Path, sid: str, record: dict) -> None:
    atomic_write_bytes(out / "records" / f"{sid}.json", json.dumps(record, indent=1).encode())


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise InputFileError(path, "no such file or folder")
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]
