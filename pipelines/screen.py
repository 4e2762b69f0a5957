"""`volscan screen`: a folder of scans in, a ranked list, native-space maps and a report out.

A thin orchestrator over the stage modules in `pipelines.stages` (each timed into
report.json): inputs (OUT, scans, masks and settings checked before any heavy work) ->
preprocess -> tokens -> score -> outputs (maps, hotspots, metrics, figures, viewer) -> the
report (`pipelines.report`). The run-folder layout is `pipelines.run_layout`.

Everything is written into a hidden temporary sibling of OUT and renamed into place at the
end (`AtomicOutputDir`), so a failure never leaves a half-written run. The default cache root
is `preprocessing.template.cache_dir()` (`$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`), outside
OUT, so `--force` re-runs keep their cached tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.inputs import Subject
from pipelines.run_layout import REPORT_HTML, RunLayout
from pipelines.screen_config import ScreenConfig
from pipelines.stages import inputs as inputs_stage

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


def default_cache_root() -> Path:
    """Cache root shared with preprocessing (`$VOLSCAN_CACHE_DIR` or `~/.cache/volscan`)."""
    from preprocessing.template import cache_dir

    return cache_dir()


def run_screen(
    input_dir: str | Path,
    out_dir: str | Path,
    config: ScreenConfig | None = None,
    *,
    labels_dir: str | Path | None = None,
    force: bool = False,
    compute: bool = True,
) -> ScreenResult:
    """Screen every NIfTI volume (or 2D image) in `input_dir`; write the run into `out_dir`.

    `labels_dir`: masks with the inputs' file names (absent or empty = healthy). `compute=False`
    (`volscan score`): the per-scan stage must already be in the cache; missing scans are an error.
    """
    config = config or ScreenConfig()
    subjects = inputs_stage.find_subjects(input_dir, out_dir, config, labels_dir, force)
    return screen_subjects(subjects, out_dir, config, force=force, source=str(Path(input_dir).resolve()),
                           labels_given=labels_dir is not None, compute=compute)


def labels_source(subjects: Sequence[Subject]) -> str | list[str]:
    """The masks' folder (resolved path), or the sorted list when they come from several: what
    `volscan evaluate` compares its `--labels` with (same folder: its own metrics, no --force)."""
    folders = sorted({str(Path(s.label).parent.resolve()) for s in subjects if s.label is not None})
    return folders[0] if len(folders) == 1 else folders


def screen_subjects(
    subjects: Sequence[Subject],
    out_dir: str | Path,
    config: ScreenConfig,
    *,
    force: bool = False,
    source: str = "subject list",
    labels_given: bool | None = None,
    compute: bool = True,
) -> ScreenResult:
    """Screen an explicit subject list (per-subject flags, e.g. BraTS registered + IXI raw).

    Metrics are computed when `labels_given` (default: when any subject has a mask); subjects
    without a mask then count as healthy. `compute=False`: see `run_screen`.
    """
    from pipelines.cache_files import run_usage
    from pipelines.evaluate import RunElements, attach_metrics, score_figures
    from pipelines.hotspots import flag_rule
    from pipelines.outputs import AtomicOutputDir
    from pipelines.report import report_rows
    from pipelines.report_build import build_report, write_run_tables
    from pipelines.stages import outputs, preprocess, score, tokens
    from pipelines.validation import check_settings

    check_settings(config)  # a settings typo is the first error, before OUT is looked at
    timer = _Timer()
    subjects = list(subjects)
    protected = tuple({s.image.parent for s in subjects} | {s.label.parent for s in subjects if s.label})
    output = AtomicOutputDir(out_dir, force, protected)
    with timer.stage("inputs"):
        checked = inputs_stage.check_run(subjects, config)
        kind, device = checked.kind, checked.device
        token_options = tokens.tokenizer_options(config, kind, device)
        scoring_config = score.scoring_options(config, device, kind)
    if labels_given is None:
        labels_given = any(s.label is not None for s in subjects)
    cache_root = (Path(config.cache).expanduser() if config.cache else default_cache_root()).resolve()
    settings = config.outputs()
    ids = [s.id for s in subjects]
    with output as work:
        layout = RunLayout(work)
        with timer.stage("preprocess"):
            prepared = preprocess.prepare(subjects, kind, config, cache_root, compute=compute)
        with timer.stage("tokens"):
            token_sets = tokens.extract_tokens(ids, kind, prepared, config, device, cache_root, token_options,
                                               backbone=checked.backbone, compute=compute)
        with timer.stage("scoring"):
            scores = score.score_tokens(token_sets.sets, config.method, scoring_config)
        elements = RunElements(ids=ids, element_scores=scores.element_scores,
                               collection_scores=scores.collection_scores, size=config.size, kind=kind,
                               brain_masks=token_sets.brain_masks)
        elements.save(layout.elements)
        rule = flag_rule(scores.collection_scores, settings.flag_z)
        threshold = rule.threshold
        with timer.stage("maps"):
            maps = outputs.write_maps(layout, subjects, elements, prepared, threshold)
        report = build_report(
            subjects, kind, config, source=source, out_dir=output.out, device=device, cache_root=cache_root,
            preprocess_info=prepared.info, token_info=token_sets.info, scores=scores, maps=maps, rule=rule,
        )
        if labels_given:
            with timer.stage("metrics"):
                attach_metrics(work, report, elements, [s.label for s in subjects], settings.histogram_bins)
            report.settings["labels"] = labels_source(subjects)
        with timer.stage("figures"):
            if not labels_given:
                score_figures(work, report, elements.collection_scores, None)
            panels = outputs.scan_panels(layout, report.subjects, subjects, elements, threshold, settings.top)
            for entry in report.subjects:
                entry.panel = panels.get(entry.id)
            graph = outputs.community_graph(layout, scores, ids, config.seed)
            if graph is not None:
                report.figures["community graph"] = graph
        if settings.viewer_scans:
            with timer.stage("viewer"):
                report.viewer = outputs.write_viewer_files(layout, report.subjects, subjects, elements,
                                                              threshold, settings.viewer_scans)
        report.timings_s = timer.seconds
        report.cache = run_usage(cache_root, Path(prepared.info["cache"]) if kind == "3d" else None,
                                 token_sets.files)
        write_run_tables(work, report)
    return ScreenResult(output.out, report_rows(report), report)
