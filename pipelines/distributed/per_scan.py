"""One scan's share of the per-scan stage, as a job any worker can run: the unit of `--part` and Ray.

The per-scan stage of a 3D scan has two phases with one cohort-wide step between them:

1. `spatial`: read, register, brain-mask, crop and resize into the cohort's preprocessing store
   (`preprocessing.cohort.preprocess_cohort(..., until="spatial")` on this one scan);
2. (cohort) Nyúl landmarks learned from every scan's spatial cube, once, by the driver;
3. `tokens`: standardise with those landmarks and extract tokens into the token cache (the
   same `preprocess_cohort` with the landmarks fixed, then `pipelines.stages.tokens`).

2D images have only the `tokens` phase. Both phases are resumable: finished work is found in
the store or the cache and skipped. Results are files in the shared caches, written by the
worker itself (atomically), so nothing but a small `ScanOutcome` travels back.

A worker keeps its last tokenizer (backbone) and template in process memory, so a worker that
runs many scans loads the model once (`_WORKER`); in a plain local run the worker is the
calling process.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.cache_locations import CacheLocations
from pipelines.stages.preprocess import prepare
from pipelines.plan import ClassicalFeatures
from pipelines.stages.tokens import make_tokenizer
from pipelines.subjects import Subject
from volumetric.cache_keys import model_input_hash, token_key

if TYPE_CHECKING:
    from preprocessing.settings import PreprocessSettings
    from volumetric.tokens import TokenSettings

log = logging.getLogger(__name__)

PHASES = ("spatial", "tokens")


@dataclass(frozen=True)
class ScanPlan:
    """Everything a per-scan job needs, the same for every scan of a run (sent once per worker):
    the parts of the run's `pipelines.plan.ScreenPlan` that one scan's work reads, without the
    loaded backbone (each worker builds or adopts its own).

    `kind` "3d"/"2d"; `device` as configured ("auto" is resolved in each worker); `cache`: the
    cache root, the cohort's preprocessing store and the token cache; `preprocess`:
    `PreprocessSettings` (with the cohort landmarks fixed for the 3D `tokens` phase);
    `tokens`: `TokenSettings` or `ClassicalFeatures`; `size`: cube edge / image side;
    `template`: the template setting (3D).
    """

    kind: str
    device: str
    cache: CacheLocations
    preprocess: "PreprocessSettings"
    tokens: "TokenSettings | ClassicalFeatures"
    size: int
    template: str | None = None


@dataclass(frozen=True)
class ScanOutcome:
    """What came of one scan's job: `computed` False when everything was already cached;
    `error` (one line) and `error_type` set when the scan failed; `seconds` of wall time;
    `worker` (process id) and `models_loaded` (backbones that worker has built so far)."""

    id: str
    input: str
    phase: str
    computed: bool = False
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0
    worker: int = 0
    models_loaded: int = 0

    @property
    def ok(self) -> bool:
        """True unless the scan failed."""
        return self.error is None


def run_scan(plan: ScanPlan, subject: Subject, phase: str) -> ScanOutcome:
    """Run `phase` ("spatial" or "tokens") of the per-scan stage for `subject`.

    Any exception of this scan is caught and returned as the outcome's error: one bad scan must
    not stop the others (it goes to the error log). A worker killed by the system is another
    matter: the backend retries the job elsewhere.
    """
    start = time.perf_counter()
    try:
        if phase == "spatial":
            computed = _spatial(plan, subject)
        elif phase == "tokens":
            computed = _tokens(plan, subject)
        else:
            raise ValueError(f"unknown per-scan phase {phase!r}")
    except Exception as exc:  # noqa: BLE001 - a scan's failure is reported, whatever its type
        message = str(exc).strip() or repr(exc)
        log.warning("%s (%s phase) failed: %s", subject.id, phase, message)
        return ScanOutcome(subject.id, str(subject.image), phase, error=message.splitlines()[0],
                           error_type=type(exc).__name__, seconds=time.perf_counter() - start,
                           worker=os.getpid(), models_loaded=_WORKER.models_loaded)
    return ScanOutcome(subject.id, str(subject.image), phase, computed=computed, seconds=time.perf_counter() - start,
                       worker=os.getpid(), models_loaded=_WORKER.models_loaded)


def _spatial(plan: ScanPlan, subject: Subject) -> bool:
    from preprocessing.cohort import preprocess_cohort

    result = preprocess_cohort(
        [subject.spec()], plan.cache.store, plan.preprocess, template=_WORKER.template(plan),
        stale="recompute", progress=False, until="spatial",
    )
    return bool(result.computed)


def _tokens(plan: ScanPlan, subject: Subject) -> bool:
    from volumetric.token_cache import TokenCache

    if plan.kind == "3d":
        from preprocessing.cohort import preprocess_cohort

        # The landmarks are fixed in `plan.preprocess`, so this standardises this one scan only.
        result = preprocess_cohort(
            [subject.spec()], plan.cache.store, plan.preprocess, template=_WORKER.template(plan),
            stale="recompute", progress=False,
        )
        record = result.records[0]
        array, brain_mask = record.load_image(), record.load_mask()
    else:
        array, brain_mask = prepare([subject], "2d", plan.preprocess, None, plan.cache).load[0]()
    tokenizer, settings = _WORKER.tokenizer(plan)
    cache = TokenCache(plan.cache.tokens)
    key = token_key(model_input_hash(array, brain_mask), settings)
    if cache.load(key) is not None:
        return False
    cache.store(key, tokenizer(array, brain_mask) if plan.kind == "3d" else tokenizer(array))
    return True


class _WorkerState:
    """What a worker process keeps between scans: its last tokenizer and template."""

    def __init__(self) -> None:
        self._tokenizer: tuple[Any, Any] | None = None
        self._template: tuple[Any, Any] | None = None
        self.models_loaded = 0  # how many times this process built a backbone (tests, logs)

    def tokenizer(self, plan: ScanPlan) -> tuple[Any, dict[str, Any]]:
        """(tokenizer, cache settings) for `plan`, built once per worker and model settings."""
        from volumetric.devices import resolve_device

        if self._tokenizer is None or self._tokenizer[0] != _model_key(plan):
            # Resolved here, in the worker: "auto" means the GPU Ray gave this worker, if any.
            device = str(resolve_device(plan.device))
            self._tokenizer = (_model_key(plan), make_tokenizer(plan.tokens, plan.size, plan.kind, device))
            self.models_loaded += 1
            log.info("worker loaded backbone %s on %s", getattr(plan.tokens, "backbone", "classical"), device)
        return self._tokenizer[1]

    def adopt(self, plan: ScanPlan, backbone: Any, device: str) -> None:
        """Use `backbone`, already loaded on `device` by this process (the validation pass), for
        `plan`'s scans run here, instead of building a second copy."""
        self._tokenizer = (_model_key(plan), make_tokenizer(plan.tokens, plan.size, plan.kind, device,
                                                            backbone=backbone))
        self.models_loaded += 1

    def template(self, plan: ScanPlan) -> Any:
        """The resolved template (loaded once per worker)."""
        from preprocessing.template import resolve_template

        if self._template is None or self._template[0] != plan.template:
            self._template = (plan.template, resolve_template(plan.template))
        return self._template[1]


def _model_key(plan: ScanPlan) -> tuple:
    """What decides a tokenizer (the token settings hold the backbone, weights, its kwargs and the
    seed): a worker rebuilds its model only when this changes."""
    return (plan.size, plan.kind, plan.device, repr(plan.tokens))


_WORKER = _WorkerState()


def adopt_backbone(plan: ScanPlan, backbone: Any, device: str) -> None:
    """Let the per-scan jobs run in this process use `backbone` (see `_WorkerState.adopt`)."""
    _WORKER.adopt(plan, backbone, device)

