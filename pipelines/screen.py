"""`volscan screen`: a folder of scans in, a ranked list, native-space maps and a report out.

A thin orchestrator over the stage modules in `pipelines.stages` (each timed into
report.json): inputs (settings, OUT, scans and masks checked before any heavy work, into the
run's `pipelines.plan.ScreenPlan`, whose parts each stage takes) ->
preprocess -> tokens -> score -> scan maps (maps, hotspots, metrics, figures, viewer) -> the
report (`pipelines.report`). The run-folder layout is `pipelines.run_layout`.

Everything is written into a hidden temporary sibling of OUT and renamed into place at the
end (`AtomicOutputDir`), so a failure never leaves a half-written run. The default cache root
is `preprocessing.template.cache_dir()` (`$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`), outside
OUT, so `--force` re-runs keep their cached tokens (`pipelines.cache_locations`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.bids import BidsSelection, bids_protected, cohort_subjects, is_bids_root
from pipelines.cache_files import run_usage
from pipelines.flagging import flag_rule
from pipelines.methods_text import methods_paragraph, write_references
from pipelines.mood import check_exports, write_mood_export
from pipelines.plan import CheckedSettings, ScreenPlan, build_plan, check_settings
from pipelines.reference import ReferenceRequest, ReferenceRun, open_reference, save_cohort
from pipelines.report import report_rows
from pipelines.report_build import build_report, write_run_tables
from pipelines.run_folder import AtomicOutputDir, check_output_dir
from pipelines.run_layout import REPORT_HTML, RunLayout
from pipelines.screen_config import ScreenConfig
from pipelines.stages import preprocess, score, tokens
from pipelines.subjects import Subject
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)


@dataclass
class ScreenResult:
    """A finished run: `out_dir`, ranked `rows` (rank 1 first), the typed `record`
    (`pipelines.report.Report`); `report` is its dictionary (what report.json holds)."""

    out_dir: Path
    rows: list[Any]
    record: Any

    @property
    def report(self) -> dict[str, Any]:
        """The report as report.json holds it."""
        return self.record.to_dict()

    @property
    def report_html(self) -> Path:
        """Path of the HTML report."""
        return self.out_dir / REPORT_HTML

    @property
    def metrics(self) -> dict[str, Any] | None:
        """Metrics against the masks, or None without labels."""
        return self.record.metrics


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def run_screen(
    input_dir: str | Path,
    out_dir: str | Path,
    config: ScreenConfig | CheckedSettings | None = None,
    *,
    labels_dir: str | Path | None = None,
    force: bool = False,
    compute: bool = True,
    bids: BidsSelection | None = None,
    exports: Sequence[str] = (),
    reference: ReferenceRequest | None = None,
) -> ScreenResult:
    """Screen every NIfTI volume (or 2D image) in `input_dir`; write the run into `out_dir`.

    `config`: the settings, or settings already checked (`pipelines.plan.check_settings`).
    `labels_dir`: masks with the inputs' file names (absent or empty = healthy). `compute=False`
    (`volscan score`): the per-scan stage must already be in the cache; missing scans are an error.
    A BIDS dataset root is read by `pipelines.bids` (`bids`: suffix and participants; default
    T1w, all). `exports`: extra output formats (`"mood"`: `pipelines.mood`). `reference`: the
    inputs are new scans scored against a finished run (`--reference RUN`, `pipelines.reference`).
    """
    # A settings typo is the first error, before OUT and the inputs are looked at.
    checked = _checked(config)
    bids_input = bids is not None or is_bids_root(input_dir)
    # A BIDS root's own `derivatives/` folder is where outputs belong: protect its participants.
    inputs = bids_protected(input_dir) if bids_input else (Path(input_dir),)
    protected = inputs + ((Path(labels_dir),) if labels_dir is not None else ())
    check_output_dir(out_dir, force, protected)  # refuse a bad OUT before reading any input
    subjects = cohort_subjects(input_dir, bids, labels_dir, registered=checked.config.registered,
                               skull_stripped=checked.config.skull_stripped,
                               minimum=1 if reference is not None else 2)  # --reference: one new scan
    return _screen(subjects, out_dir, checked, force=force, source=str(Path(input_dir).resolve()),
                   labels_given=labels_dir is not None, compute=compute, exports=exports,
                   reference=reference)


def _checked(config: ScreenConfig | CheckedSettings | None) -> CheckedSettings:
    """Settings checked once (`check_settings`), or as given when already checked; None = defaults."""
    return config if isinstance(config, CheckedSettings) else check_settings(config or ScreenConfig())


def labels_source(subjects: Sequence[Subject]) -> str | list[str]:
    """The masks' folder (resolved path), or the sorted list when they come from several: what
    `volscan evaluate` compares its `--labels` with (same folder: its own metrics, no --force)."""
    folders = sorted({str(Path(s.label).parent.resolve()) for s in subjects if s.label is not None})
    return folders[0] if len(folders) == 1 else folders


def screen_subjects(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    config: ScreenConfig | CheckedSettings,
    *,
    force: bool = False,
    source: str = "subject list",
    labels_given: bool | None = None,
    compute: bool = True,
    exports: Sequence[str] = (),
    reference: ReferenceRequest | None = None,
) -> ScreenResult:
    """Screen an explicit subject list (per-subject flags, e.g. BraTS registered + IXI raw).

    Metrics are computed when `labels_given` (default: when any subject has a mask); subjects
    without a mask then count as healthy. `compute=False`, `exports`, `reference`: see `run_screen`.
    """
    # A settings typo is the first error, before OUT is looked at.
    checked = _checked(config)
    return _screen(subjects, out_dir, checked, force=force, source=source, labels_given=labels_given, compute=compute,
                   exports=exports, reference=reference)


def _screen(subjects: Sequence[Subject], out_dir: str | Path, checked: CheckedSettings, *, force: bool, source: str,
            labels_given: bool | None, compute: bool, exports: Sequence[str],
            reference: ReferenceRequest | None) -> ScreenResult:
    """The run of `screen_subjects` once its settings are checked: OUT, the plan, then the stages."""
    if reference is not None and "mood" in exports:  # MOOD's [0, 1] scale spans the run's own scans
        raise VolscanError("--export mood scales the scores over the screened scans; with --reference the new scans' "
                           "scale is the reference's (report percentiles): screen without --export mood")
    # --reference: read and verify the reference run; new scans take its Nyúl landmarks
    base = open_reference(reference) if reference is not None else None
    checked = base.adapt(checked) if base is not None else checked
    # A --reference run is read, never replaced by this one (even with --force).
    output = _output_dir(subjects, out_dir, force, (base.folder,) if base is not None else ())
    timer = _Timer()
    with timer.stage("inputs"):
        plan = build_plan(subjects, checked, len(base.ids) if base is not None else 0)
        check_exports(exports, plan.kind, subjects)  # an unknown or 2D export refused before preprocessing
        tokenizer = None
        if base is not None:  # --reference: same settings as the reference, its tokens loaded
            tokenizer = tokens.make_tokenizer(plan.tokens, plan.size, plan.kind, plan.device, plan.backbone)
            base.check(plan, tokenizer[1])
            base = base.with_tokens()
    return _run_stages(plan, output, timer, source=source, labels_given=labels_given, compute=compute,
                       exports=exports, base=base, tokenizer=tokenizer)


def screen_plan(plan: ScreenPlan, out_dir: str | Path, *, force: bool = False, source: str = "subject list",
                labels_given: bool | None = None, compute: bool = True,
                exports: Sequence[str] = ()) -> ScreenResult:
    """Screen a run already planned (`pipelines.plan.build_plan`; e.g. one plan, several methods);
    the arguments as for `screen_subjects`."""
    check_exports(exports, plan.kind, plan.subjects)
    return _run_stages(plan, _output_dir(plan.subjects, out_dir, force), _Timer(), source=source,
                       labels_given=labels_given, compute=compute, exports=exports)


def _output_dir(subjects: Sequence[Subject], out_dir: str | Path, force: bool,
                also: Sequence[Path] = ()) -> AtomicOutputDir:
    """OUT checked (not overlapping any input or mask folder, nor the folders in `also`) and claimed."""
    protected = tuple({s.image.parent for s in subjects} | {s.label.parent for s in subjects if s.label} | set(also))
    return AtomicOutputDir(out_dir, force, protected)


def _run_stages(plan: ScreenPlan, output: AtomicOutputDir, timer: _Timer, *, source: str,
                labels_given: bool | None, compute: bool, exports: Sequence[str],
                base: ReferenceRun | None = None, tokenizer: tuple[Any, dict[str, Any]] | None = None) -> ScreenResult:
    """The stages of a planned run, each timed, into `output` (see the module docstring); `base`:
    the reference run of a `--reference` screen, its tokens loaded; `tokenizer`: the plan's
    tokenizer and its settings when already built (`tokens.make_tokenizer`)."""
    # Here, not at the top: these load torch, monai and matplotlib, which a settings or input
    # error is answered without.
    from pipelines.evaluate import RunElements, attach_metrics, score_figures
    from pipelines.stages import scan_maps

    subjects = list(plan.subjects)
    if labels_given is None:
        labels_given = any(s.label is not None for s in subjects)
    kind, settings = plan.kind, plan.outputs
    ids = [s.id for s in subjects]
    with output as work:
        layout = RunLayout(work)
        with timer.stage("preprocess"):
            prepared = preprocess.prepare(subjects, kind, plan.preprocess, plan.template, plan.cache, compute=compute)
        with timer.stage("tokens"):
            token_sets = tokens.extract_tokens(ids, kind, prepared, plan.tokens, plan.size, plan.device,
                                               plan.cache.tokens, backbone=plan.backbone, compute=compute,
                                               tokenizer=tokenizer)
        with timer.stage("scoring"):
            if base is None:
                scores = score.score_tokens(token_sets.sets, plan.method, plan.scoring)
                save_cohort(layout.cohort, ids, token_sets.files, scores.excluded, scores.kept_minima)
            else:  # --reference: the new scans against the reference's tokens
                base.check_distinct(ids, token_sets.files)
                scores = base.score(token_sets.sets, plan.method, plan.scoring)
        elements = RunElements(ids=ids, element_scores=scores.element_scores,
                               collection_scores=scores.collection_scores, size=plan.size, kind=kind,
                               brain_masks=token_sets.brain_masks)
        elements.save(layout.elements)
        rule = flag_rule(scores.collection_scores, settings.flag_z) if base is None else base.rule(scores)
        threshold = rule.threshold
        with timer.stage("maps"):
            maps = scan_maps.write_maps(layout, subjects, elements, prepared, threshold)
        if "mood" in exports:  # bids/mood wiring: MOOD challenge files from the maps just written
            write_mood_export(layout, subjects, elements, maps)
        report = build_report(
            plan, source=source, out_dir=output.out, preprocess_info=prepared.info, token_info=token_sets.info,
            scores=scores, maps=maps, rule=rule,
        )
        if base is not None:  # --reference: percentiles of the reference, both cohorts in the report
            base.annotate(report, scores)
        if labels_given:
            with timer.stage("metrics"):
                attach_metrics(work, report, elements, [s.label for s in subjects], settings.histogram_bins)
            report.settings["labels"] = labels_source(subjects)
        with timer.stage("figures"):
            if not labels_given:
                score_figures(work, report, elements.collection_scores, None)
            panels = scan_maps.scan_panels(layout, report.subjects, subjects, elements, threshold, settings.top)
            for entry in report.subjects:
                entry.panel = panels.get(entry.id)
            graph = scan_maps.community_graph(layout, scores, ids, plan.seed)
            if graph is not None:
                report.figures["community graph"] = graph
        if settings.viewer_scans:
            with timer.stage("viewer"):
                report.viewer = scan_maps.write_viewer_files(layout, report.subjects, subjects, elements,
                                                              threshold, settings.viewer_scans)
        report.timings_s = timer.seconds
        report.methods = methods_paragraph(report)
        write_references(work, report)
        report.cache = run_usage(plan.cache.root, Path(prepared.info["cache"]) if kind == "3d" else None,
                                 token_sets.files)
        write_run_tables(work, report)
    return ScreenResult(output.out, report_rows(report), report)
