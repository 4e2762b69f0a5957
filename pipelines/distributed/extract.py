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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.distributed.error_log import ErrorLog
from pipelines.distributed.per_scan import ScanOutcome, ScanPlan, adopt_backbone, spec_of
from pipelines.distributed.runners import LocalRunner, RayRunner, RaySettings
from pipelines.distributed.sharding import Part
from pipelines.inputs import Subject
from pipelines.screen_config import ScreenConfig
from volumetric.cache_keys import extract_logs
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

STAGES = ("all", "spatial", "landmarks", "tokens")


@dataclass(frozen=True)
class ExtractSettings:
    """How to run the per-scan stage: which `part` of the cohort, which `stage`, and on Ray
    (`ray` settings) or in this process (`ray=None`); `progress` bars on the terminal."""

    part: Part = Part()
    stage: str = "all"
    ray: RaySettings | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise VolscanError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")


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


def extract_folder(subjects: Sequence[Subject], config: ScreenConfig, cache_root: Path) -> Path:
    """Where the extract runs of this cohort keep their error logs: `<cache>/extract/<cohort digest>`."""
    from pipelines.stages.preprocess import cohort_folder

    return extract_logs(cache_root, cohort_folder(subjects, config, cache_root).name)


def run_extract(subjects: Sequence[Subject], config: ScreenConfig, settings: ExtractSettings = ExtractSettings()) -> ExtractResult:
    """Run `settings.stage` of the per-scan stage for `settings.part` of `subjects` (the whole cohort).

    Every setting and input header is checked first (as `volscan screen` does); then one job
    per scan of the part runs on the chosen runner. Scans that fail are logged and skipped.
    """
    from pipelines.screen import default_cache_root
    from pipelines.stages import inputs as inputs_stage
    from pipelines.stages.preprocess import cohort_folder
    from pipelines.stages.tokens import tokenizer_options

    subjects = sorted(subjects, key=lambda s: s.id)
    checked = inputs_stage.check_run(subjects, config)  # also builds the backbone once: a bad model fails here
    kind = checked.kind
    preprocess = config.preprocess_settings() if kind == "3d" else None
    cache_root = (Path(config.cache).expanduser() if config.cache else default_cache_root()).resolve()
    plan = ScanPlan(kind=kind, config=config, device=config.device, cache_root=cache_root,
                    store=cohort_folder(subjects, config, cache_root) if kind == "3d" else None,
                    preprocess=preprocess, token_options=tokenizer_options(config, kind))
    part, stage = settings.part, settings.stage
    fixed_landmarks = kind == "3d" and preprocess.landmarks is not None
    if kind == "3d" and stage == "all" and not part.whole and not fixed_landmarks:
        raise VolscanError(
            f"--part {part.index}/{part.count} with learned Nyúl landmarks needs three steps: --stage spatial for "
            "every part, then --stage landmarks once, then --stage tokens for every part (or fix the landmarks: "
            "config preprocess: {landmarks: FILE})"
        )
    chosen = set(part.select(s.id for s in subjects))
    mine = [s for s in subjects if s.id in chosen]
    folder = extract_folder(subjects, config, cache_root)
    # One log per stage and part: a later stage's run must not erase an earlier stage's failures.
    log_name = {"all": part.label, "landmarks": "landmarks"}.get(stage, f"{stage}-{part.label}")
    errors = ErrorLog(folder / f"errors-{log_name}.jsonl")
    result = ExtractResult(kind=kind, scans=[s.id for s in mine], failed=[], computed=0,
                           error_log=errors.path, cache_root=cache_root)
    if settings.ray is None:
        runner: LocalRunner | RayRunner = LocalRunner()
        adopt_backbone(plan, checked.backbone, checked.device)
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
    if plan.store is not None and plan.store.is_dir():
        from preprocessing.store import mark_used

        mark_used(plan.store)  # the store's last use, for `volscan cache prune --older-than`
    return result


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
    from pipelines.distributed.error_log import read_error_logs
    from preprocessing.cohort import preprocess_cohort
    from preprocessing.store import read_record

    failed = {o.id for o in result.failed}
    failed |= {sid for sid, e in read_error_logs(errors.path.parent).items() if e.get("phase") == "spatial"}
    usable, missing = [], []
    for subject in subjects:
        if read_record(plan.store, subject.id).get("spatial_key"):
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
    preprocess_cohort([spec_of(s) for s in usable], plan.store, plan.preprocess, template=plan.config.template,
                      stale="recompute", until="landmarks", progress=progress)


def _with_landmarks(plan: ScanPlan) -> ScanPlan:
    """`plan` with the cohort's stored landmarks fixed, so each tokens job standardises its scan only."""
    import dataclasses

    from preprocessing.cohort import LANDMARKS_FILE

    if plan.preprocess.landmarks is not None:
        return plan
    path = plan.store / LANDMARKS_FILE
    if not path.is_file():
        raise VolscanError(f"{path}: the cohort's landmarks are not learned yet; run --stage landmarks first")
    return dataclasses.replace(plan, preprocess=plan.preprocess.replace(landmarks=str(path)))
