"""`volscan reproduce brats-mets-ixi`: the published BraTS-METS (metastases) vs IXI (healthy) experiment.

Protocol (Le-Gia, dissertation chapter on 3D MRI; see docs/reproduce.md): a seeded choice of
100 IXI T2 (healthy) and 50 pre-treatment BraTS-METS 2025 T2 (metastases) scans, read in the
datasets' own layout (`pipelines.datasets`); IXI registered to SRI-24 and brain-masked, BraTS
used as distributed (already SRI-24, skull-stripped); 224^3 cubes, DINOv2-L/14 tokens; scored
by CoDeGraph and by MuSc on the same tokens; patient AUROC / F1-max (max over tokens) and
voxel AUROC / Dice (paper protocol, `volumetric.metrics`). Writes OUT/table.md and
OUT/table.json (our numbers beside the paper's), OUT/selection.json (the chosen scans) and
one `volscan screen` run per method under OUT/<method>/.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.choices import METHODS
from pipelines.datasets import choose, find_brats_mets, find_ixi_t2, write_selection
from pipelines.plan import build_plan, check_settings
from pipelines.run_folder import AtomicOutputDir, atomic_write_text
from pipelines.screen import screen_plan
from pipelines.screen_config import ScreenConfig
from pipelines.subjects import Subject
from pipelines.validation import check_cohort_size
from volumetric.errors import VolscanError

log = logging.getLogger(__name__)

EXPERIMENT = "brats-mets-ixi"
METRICS = ("patient_auroc", "f1_max", "voxel_auroc", "dice")
METRIC_TITLES = {"patient_auroc": "patient AUROC", "f1_max": "F1-max", "voxel_auroc": "voxel AUROC", "dice": "Dice"}
# The paper's reference numbers (percent), BraTS-METS 2025 T2 (50 pre-treatment) + IXI T2 (100
# healthy), 224^3 cubes: Le-Gia, PhD dissertation (2026), 3D MRI chapter, as summarised in the
# project's method notes. The DINOv2-L/14 rows are the ones this command reproduces.
PAPER_ROWS = (
    {"method": "CoDeGraph", "backbone": "DINOv2-L/14", "patient_auroc": 99.96, "f1_max": 99.01,
     "voxel_auroc": 98.17, "dice": 75.43},
    {"method": "CoDeGraph", "backbone": "CLIP ViT-L/14", "patient_auroc": 98.30, "f1_max": 93.33,
     "voxel_auroc": 97.20, "dice": 62.87},
    {"method": "MuSc", "backbone": "DINOv2-L/14", "patient_auroc": 97.34, "f1_max": 88.89,
     "voxel_auroc": 97.80, "dice": 67.73},
    {"method": "MuSc", "backbone": "CLIP ViT-L/14", "patient_auroc": 98.40, "f1_max": 92.45,
     "voxel_auroc": 97.28, "dice": 61.65},
    {"method": "AnomalyCLIP (tuned on brain slices)", "backbone": "ViT-L/14", "patient_auroc": 87.56,
     "f1_max": 75.00, "voxel_auroc": 94.93, "dice": 6.79},
    {"method": "APRIL-GAN (tuned on brain slices)", "backbone": "ViT-L/14", "patient_auroc": 24.38,
     "f1_max": 50.00, "voxel_auroc": 96.58, "dice": 68.22},
)
PAPER_COMMUNITY_SIZES = (13, 34)
METHOD_NAMES = {"codegraph": "CoDeGraph", "musc": "MuSc"}


def paper_row(method: str, backbone: str = "DINOv2-L/14") -> dict[str, float]:
    """The paper's numbers (percent) for `method` ("codegraph" / "musc") with `backbone`."""
    name = METHOD_NAMES[method]
    return next(r for r in PAPER_ROWS if r["method"] == name and r["backbone"] == backbone)


def results_table(ours: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any],
                  timings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The table as a JSON-ready dict: per method our metrics (percent), the paper's, differences.

    `ours`: method -> {metric: value in [0, 1] or None, "communities": [sizes] (CoDeGraph)}.
    `settings`: what was run (backbone, weights, cube size, counts, seed...), recorded verbatim;
    `timings`: method -> {stage: seconds} of the screen runs.
    """
    rows = []
    for method, values in ours.items():
        reference = paper_row(method)
        row: dict[str, Any] = {"method": METHOD_NAMES[method], "backbone": settings.get("backbone"),
                               "paper_backbone": reference["backbone"]}
        for metric in METRICS:
            value = values.get(metric)
            ours_pct = None if value is None or not math.isfinite(value) else round(100.0 * float(value), 2)
            row[metric] = {"ours": ours_pct, "paper": reference[metric],
                           "difference": None if ours_pct is None else round(ours_pct - reference[metric], 2)}
        if "communities" in values:
            row["communities"] = list(values["communities"])
        rows.append(row)
    return {"experiment": EXPERIMENT, "settings": dict(settings), "timings_s": dict(timings or {}), "rows": rows,
            "paper_community_sizes": list(PAPER_COMMUNITY_SIZES),
            "paper_rows": [dict(r) for r in PAPER_ROWS]}


def table_markdown(table: Mapping[str, Any]) -> str:
    """Markdown rendering of `results_table`'s output: ours beside the paper's, then the paper's full table."""
    settings = table["settings"]
    lines = [f"# {EXPERIMENT}: our numbers beside the paper's", "",
             "Percent. Paper: Le-Gia, dissertation (2026), BraTS-METS 2025 T2 (50 pre-treatment) + IXI T2 "
             "(100 healthy), 224^3, DINOv2-L/14.", ""]
    if settings.get("weights") == "random":
        lines += ["**WARNING: random backbone weights: these numbers only show the pipeline runs; "
                  "they are not a reproduction.**", ""]
    header = ["method", "backbone"] + [f"{METRIC_TITLES[m]} ours / paper (diff)" for m in METRICS] + ["communities"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["method"], str(row["backbone"])]
        for metric in METRICS:
            entry = row[metric]
            ours = "n/a" if entry["ours"] is None else f"{entry['ours']:.2f}"
            diff = "" if entry["difference"] is None else f" ({entry['difference']:+.2f})"
            cells.append(f"{ours} / {entry['paper']:.2f}{diff}")
        communities = row.get("communities")
        paper_sizes = " + ".join(str(s) for s in table["paper_community_sizes"])
        cells.append("—" if communities is None else
                     f"{len(communities)} ({', '.join(map(str, communities)) or 'none'}; paper {paper_sizes})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())]
    for method, stages in table.get("timings_s", {}).items():
        if stages:
            lines.append(f"Wall time, {METHOD_NAMES.get(method, method)} run (s): "
                         + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in stages.items()))
    lines += ["",
              "## The paper's full table", "",
              "| method | backbone | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
              "|---|---|---|---|---|---|"]
    for row in table["paper_rows"]:
        lines.append(f"| {row['method']} | {row['backbone']} | "
                     + " | ".join(f"{row[m]:.2f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, ours: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any],
                timings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write OUT/table.json and OUT/table.md atomically; return the table dict."""
    table = results_table(ours, settings, timings)
    atomic_write_text(Path(out_dir) / "table.json", json.dumps(table, indent=1))
    atomic_write_text(Path(out_dir) / "table.md", table_markdown(table))
    return table


def method_list(methods: Sequence[str]) -> list[str]:
    """Validated, de-duplicated list of methods to run."""
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise VolscanError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(methods))


def screen_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The table's metrics (fractions) and CoDeGraph community sizes from a screen report."""
    metrics = report.get("metrics") or {}
    values: dict[str, Any] = {
        "patient_auroc": metrics.get("patient_auroc"),
        "f1_max": metrics.get("patient_f1_max"),
        "voxel_auroc": metrics.get("voxel_auroc"),
        # The paper's Dice counts a lesion-free scan without a positive voxel as 1: mean over all scans.
        "dice": metrics.get("dice_mean_all"),
        "voxel_auroc_brain": metrics.get("voxel_auroc_brain"),
        "dice_mean_lesion": metrics.get("dice_mean_lesion"),
    }
    codegraph = report.get("codegraph")
    if codegraph:
        # Sizes of the outlier (anomalous) communities, the number the paper reports (13 and 34).
        values["communities"] = sorted((len(m) for m in codegraph.get("outlier_communities") or []), reverse=True)
    return values


def run_reproduction(brats_dir: str | Path, ixi_dir: str | Path, out_dir: str | Path, config: ScreenConfig, *,
                     n_brats: int = 50, n_ixi: int = 100, seed: int = 0, brats_timepoints: str = "000",
                     brats_cases: str | Path | None = None, methods: Sequence[str] = METHODS,
                     force: bool = False) -> dict[str, Any]:
    """Run the experiment; write OUT/{table.md, table.json, selection.json, <method>/}; return the table.

    `config` holds the screen settings (backbone, weights, cube size, device, template, cache);
    its `method` is replaced by each entry of `methods` in turn, the runs sharing one cache so
    preprocessing and tokens are computed once.
    """
    methods = method_list(methods)
    preprocess_keys = {str(k).replace("-", "_") for k in config.preprocess}
    if config.bias_correction is None and "bias_correction" not in preprocess_keys:
        config = replace(config, bias_correction="none")  # the paper's protocol has no bias-field step
    # A settings typo is the first error, before OUT and the datasets.
    checked = check_settings(replace(config, method=methods[0]))
    output = AtomicOutputDir(out_dir, force, protected=(Path(brats_dir), Path(ixi_dir)),
                             command="reproduce")  # fails before any work
    ixi = choose(find_ixi_t2(ixi_dir), n_ixi, seed, "IXI T2")
    brats = choose(find_brats_mets(brats_dir, brats_timepoints, brats_cases), n_brats, seed, "BraTS-METS")
    scans = ixi + brats
    subjects = [Subject(id=s.id, image=s.image, label=s.label, registered=s.registered,
                        skull_stripped=s.skull_stripped) for s in scans]
    log.info("%s: %d IXI + %d BraTS-METS scans, methods %s", EXPERIMENT, len(ixi), len(brats), ", ".join(methods))
    for method in methods:
        check_cohort_size(len(subjects), method)
    plan = build_plan(subjects, checked)  # one plan (backbone loaded once) for every method
    preprocess = plan.preprocess  # the paper's protocol unless a --config file changed it
    settings = {"backbone": config.backbone, "weights": config.weights or "timm hub", "size": plan.size,
                "brain_mask": preprocess.brain_mask, "bias_correction": preprocess.bias_correction,
                "n_ixi": len(ixi), "n_brats": len(brats), "seed": seed,
                "brats_rule": f"case list {brats_cases}" if brats_cases else f"timepoint {brats_timepoints}"}
    with output as work:
        write_selection(scans, work / "selection.json", seed)
        ours, timings = {}, {}
        for method in methods:
            result = screen_plan(replace(plan, method=method, record={**plan.record, "method": method}),
                                 work / method, source=f"{EXPERIMENT} selection", labels_given=True)
            ours[method] = screen_metrics(result.report)
            timings[method] = result.report.get("timings_s")
        table = write_table(work, ours, settings, timings)
    return table
