"""`volscan extract`: the per-scan stage of a screen (preprocess + tokens) into the shared caches.

The contract on disk is the cache `volscan screen` itself uses: the cohort's preprocessing store
(`<cache>/preprocess/<cohort digest>`) and the token cache (`<cache>/tokens`), so `volscan
score` (and `volscan screen`) afterwards find every scan's tokens and extract nothing. Each run
of a part also writes `<cache>/extract/<cohort digest>/errors-<stage>-<part>.jsonl` (see
`pipelines.distributed.error_log`); a failed scan is logged there and the others go on.

Stages (`--stage`), see `per_scan` for the phases:
- `all` (default): spatial -> cohort landmarks -> tokens. For one part of several (`--part`)
  this needs fixed landmarks (config `preprocess: {landmarks: FILE}`): the learned landmarks
  depend on every scan, so sharded runs with learned landmarks go stage by stage:
- `spatial` (per part) -> `landmarks` (once, after every part's spatial stage) -> `tokens`
  (per part).
2D images have no spatial phase and no landmarks: `all` and `tokens` extract tokens directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.choices import EXTRACT_STAGES, listed
from pipelines.distributed.error_log import ErrorLog, read_error_logs
from pipelines.distributed.per_scan import ScanOutcome, ScanPlan, adopt_backbone
from pipelines.distributed.runners import LocalRunner, RayRunner, RaySettings
from pipelines.distributed.sharding import Part
from pipelines.plan import ScreenPlan, build_plan, check_settings
from pipelines.screen_config import ScreenConfig
from pipelines.subjects import Subject
from volumetric.errors import VolscanError
from volumetric.hashing import digest

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExtractSettings:
    """How to run the per-scan stage: which `part` of the cohort, which `stage`, and on Ray
    (`ray` settings) or in this process (`ray=None`); `progress` bars on the terminal."""

    part: Part = Part()
    stage: str = "all"
    ray: RaySettings | None = None
    progress: bool = True
    ids: frozenset[str] | None = None  # only these scans of the part (`volscan bids --participant-label`)

    def __post_init__(self) -> None:
        if self.stage not in EXTRACT_STAGES:
            raise VolscanError(f"--stage must be {listed(EXTRACT_STAGES)}, got {self.stage!r}")


@dataclass
class ExtractResult:
    """`scans`: ids of this part; `failed`: outcomes of the scans that failed (also in `error_log`);
    `computed`: scans whose work ran now (the rest was cached); `seconds`: wall time per phase;
    `workers`: {worker process id: backbones it built} over the tokens phase (1 each when the
    model was loaded once per worker)."""

    kind: str
    scans: list[str]
    failed: list[ScanOutcome]
    computed: int
    error_log: Path
    cache_root: Path
    seconds: dict[str, float] = field(default_factory=dict)
    workers: dict[int, int] = field(default_factory=dict)


def run_extract(subjects: Sequence[Subject], config: ScreenConfig, settings: ExtractSettings = ExtractSettings()) -> ExtractResult:
    """Run `settings.stage` of the per-scan stage for `settings.part` of `subjects` (the whole cohort).

    Every setting and input header is checked first, into the run's `ScreenPlan` (as `volscan
    screen` does); then one job per scan of the part runs on the chosen runner. Scans that fail
    are logged and skipped.
    """
    checked = check_settings(config)
    plan = build_plan(sorted(subjects, key=lambda s: s.id), checked)  # also loads the backbone: a bad model fails here
    return extract_planned(plan, settings)


def scan_plan(plan: ScreenPlan) -> ScanPlan:
    """The per-scan part of `plan` (what each job needs; the device as asked, resolved per worker)."""
    return ScanPlan(kind=plan.kind, device=plan.device_setting, cache=plan.cache, preprocess=plan.preprocess,
                    tokens=plan.tokens, size=plan.size, template=plan.template)


def extract_planned(screen: ScreenPlan, settings: ExtractSettings = ExtractSettings()) -> ExtractResult:
    """`run_extract` for a run already planned (its subjects sorted by id)."""
    subjects, kind = list(screen.subjects), screen.kind
    plan = scan_plan(screen)
    part, stage = settings.part, settings.stage
    fixed_landmarks = kind == "3d" and plan.preprocess.landmarks is not None
    if kind == "3d" and stage == "all" and not (part.whole and settings.ids is None) and not fixed_landmarks:
        raise VolscanError(
            f"--part {part.index}/{part.count} with learned Nyúl landmarks needs three steps: --stage spatial for "
            "every part, then --stage landmarks once, then --stage tokens for every part (or fix the landmarks: "
            "config preprocess: {landmarks: FILE})"
        )
    chosen = set(part.select(s.id for s in subjects))
    if settings.ids is not None:
        chosen &= settings.ids
    mine = [s for s in subjects if s.id in chosen]
    # One log per stage and part: a later stage's run must not erase an earlier stage's failures.
    label = part.label if settings.ids is None else f"{part.label}-ids-{_ids_tag(settings.ids)}"
    log_name = {"all": label, "landmarks": "landmarks"}.get(stage, f"{stage}-{label}")
    errors = ErrorLog(plan.cache.extract_logs / f"errors-{log_name}.jsonl")
    result = ExtractResult(kind=kind, scans=[s.id for s in mine], failed=[], computed=0,
                           error_log=errors.path, cache_root=plan.cache.root)
    if settings.ray is None:
        runner: LocalRunner | RayRunner = LocalRunner()
        adopt_backbone(plan, screen.backbone, screen.device)
    else:
        runner = RayRunner(settings.ray)
    phases = {"all": ("spatial", "landmarks", "tokens"), "spatial": ("spatial",), "landmarks": ("landmarks",),
              "tokens": ("tokens",)}[stage]
    if kind == "2d":
        phases = tuple(p for p in phases if p == "tokens")
    if fixed_landmarks:
        phases = tuple(p for p in phases if p != "landmarks")
    with runner:
        runner.check_feasible(plan)  # a task no node can run would wait for ever
        errors.start()  # only now: a refused run leaves the previous log of this part as it was
        for phase in phases:
            start = time.perf_counter()
            if phase == "landmarks":
                _learn_landmarks(plan, subjects, errors, result, settings.progress)
            else:
                if phase == "tokens" and kind == "3d":
                    plan = _with_landmarks(plan)
                failed = {o.id for o in result.failed}
                _run_phase(runner, plan, [s for s in mine if s.id not in failed], phase, errors, result,
                           settings.progress)
            result.seconds[phase] = round(time.perf_counter() - start, 3)
    if kind == "3d" and plan.cache.store.is_dir():
        from preprocessing.store import mark_used

        mark_used(plan.cache.store)  # the store's last use, for `volscan cache prune --older-than`
    return result


def _ids_tag(ids: frozenset[str]) -> str:
    """A short name for a set of scan ids (runs for different participants log apart)."""
    return digest(sorted(ids), 12)


def _run_phase(runner: Any, plan: ScanPlan, subjects: list[Subject], phase: str, errors: ErrorLog,
               result: ExtractResult, progress: bool) -> None:
    """Run `phase` for `subjects` on `runner`; log each failure as it comes."""
    from tqdm.auto import tqdm

    with tqdm(total=len(subjects), desc=f"{phase} ({runner.name})", unit="scan", disable=not progress) as bar:
        for outcome in runner.map(plan, subjects, phase):
            if not outcome.ok:
                errors.add(outcome.id, outcome.input, phase, outcome.error or "", outcome.error_type or "")
                result.failed.append(outcome)
            elif outcome.computed and phase == "tokens":
                result.computed += 1
            if phase == "tokens":
                result.workers[outcome.worker] = max(result.workers.get(outcome.worker, 0), outcome.models_loaded)
            bar.set_postfix_str(outcome.id)
            bar.update()
    log.info("%s phase: %d scan(s), %d failed", phase, len(subjects), len(result.failed))


def _learn_landmarks(plan: ScanPlan, subjects: list[Subject], errors: ErrorLog, result: ExtractResult,
                     progress: bool) -> None:
    """Learn the cohort's Nyúl landmarks from every scan's spatial outputs, in this process.

    Scans that failed in this run or in a logged spatial stage are left out (`volscan score`
    names them later); scans never run through the spatial stage are an error naming them."""
    from preprocessing.cohort import preprocess_cohort
    from preprocessing.store import read_record

    failed = {o.id for o in result.failed}
    failed |= {sid for sid, e in read_error_logs(errors.path.parent).items() if e.get("phase") == "spatial"}
    usable, missing = [], []
    for subject in subjects:
        if read_record(plan.cache.store, subject.id).get("spatial_key"):
            usable.append(subject)
        elif subject.id not in failed:
            missing.append(subject.id)
    if missing:
        raise VolscanError(
            f"the spatial stage of {len(missing)} scan(s) has not run (e.g. {missing[0]}): run --stage spatial "
            "for every part before --stage landmarks"
        )
    if not usable:
        raise VolscanError(f"no scan passed the spatial stage; see {errors.path.parent}")
    preprocess_cohort([s.spec() for s in usable], plan.cache.store, plan.preprocess, template=plan.template,
                      stale="recompute", until="landmarks", progress=progress)


def _with_landmarks(plan: ScanPlan) -> ScanPlan:
    """`plan` with the cohort's stored landmarks fixed, so each tokens job standardises its scan only."""
    from preprocessing.cohort import LANDMARKS_FILE

    if plan.preprocess.landmarks is not None:
        return plan
    path = plan.cache.store / LANDMARKS_FILE
    if not path.is_file():
        raise VolscanError(f"{path}: the cohort's landmarks are not learned yet; run --stage landmarks first")
    return dataclasses.replace(plan, preprocess=plan.preprocess.replace(landmarks=str(path)))
