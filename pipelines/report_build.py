"""Building a screen run's `Report` from its stages' results, and writing its three tables.

`build_report` records every setting as used (defaults resolved at run time written with their
values), the ranking with hotspots and flags, and the CoDeGraph communities; `write_run_tables`
writes scores.csv, report.json and report.html as one set.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.flagging import rank_percentile
from pipelines.json_ready import plain
from pipelines.run_folder import atomic_write_texts
from pipelines.report import Report, ScanEntry, rank_scores, report_json_text, report_rows, scores_csv_text
from pipelines.report_html import report_html
from pipelines.run_layout import REPORT_HTML, REPORT_JSON, SCORES_CSV
from volumetric.hashing import volscan_version

if TYPE_CHECKING:
    from pipelines.plan import ScreenPlan

RANDOM_WEIGHTS_WARNING = (
    "Backbone weights are RANDOM: scores and maps are meaningless on real data "
    "(use --weights PATH or the default pretrained DINOv2 weights)."
)

def _mask_warnings(preprocess_info: dict[str, Any]) -> list[str]:
    """One line per distinct brain-mask warning (the template fallback), naming its scans."""
    scans: dict[str, list[str]] = {}
    for sid, messages in preprocess_info.get("warnings", {}).items():
        for message in messages:
            scans.setdefault(message, []).append(sid)
    return [f"brain mask of {len(ids)} scan(s) ({', '.join(ids)}): {message}" for message, ids in scans.items()]


def build_report(
    plan: "ScreenPlan",
    *,
    source: str,
    out_dir: Path,
    preprocess_info: dict[str, Any],
    token_info: dict[str, Any],
    scores: Any,
    maps: Any,
    rule: Any,
) -> Report:
    """The report of a screen run, before metrics, figures and viewer.

    `plan`: the run's `ScreenPlan`; `scores`: the score stage's `Scores`;
    `maps`: the scan-maps stage's `MapFiles` (`pipelines.stages.scan_maps`); `rule`: the
    `pipelines.flagging.FlagRule` of the run.
    Settings are reported as used: defaults resolved at run time (layers, projection width,
    device, cache, template) are written with their values, paths absolute."""
    subjects, kind, given = plan.subjects, plan.kind, plan.record
    ids = [s.id for s in subjects]
    by_id = {s.id: s for s in subjects}
    rows = rank_scores(ids, scores.collection_scores)
    entries = [
        ScanEntry(
            id=row.id, rank=row.rank, score=row.score, percentile=round(rank_percentile(row.rank, len(rows)), 1),
            flagged=bool(row.score > rule.threshold), image=str(by_id[row.id].image.resolve()),
            label_file=str(by_id[row.id].label.resolve()) if by_id[row.id].label is not None else None,
            map=maps.files[row.id][0], map_files=maps.files[row.id], hotspot=maps.hotspots[row.id].to_dict(),
            brain_mask=preprocess_info.get("brain_mask", {}).get(row.id),
        )
        for row in rows
    ]
    token_settings = token_info["settings"]
    settings = dict(
        given,
        layers=token_settings.get("layers"),
        proj_dim=token_settings.get("proj_dim"),
        precision=token_settings.get("precision"),
        slices_per_block=token_settings.get("slices_per_block"),
        device=plan.device,
        cache=str(plan.cache.root),
        template=preprocess_info.get("template", plan.template),
    )
    settings["scoring"] = scores.settings
    if kind == "3d":
        preprocess = plan.preprocess
        settings["preprocess"] = plain(preprocess)
        # Resolved (flag, else the `preprocess` table, else the default): None would read "(not used)".
        settings["brain_mask"] = settings["preprocess"]["brain_mask"]
        # "auto" resolved: N4 unless the inputs are registered and skull-stripped.
        settings["bias_correction"] = preprocess.bias_correction
        if preprocess.bias_correction == "auto":
            settings["bias_correction"] += " (n4)" if preprocess.n4_applies else " (off)"
        # What `auto` resolved to, per scan (H10): {extractor: [scan ids]}.
        used = preprocess_info.get("brain_mask", {})
        settings["brain_mask_used"] = {m: [i for i, v in used.items() if v == m] for m in sorted(set(used.values()))}
    codegraph = None
    if scores.graph is not None:
        communities = [[ids[v] for v in members] for members in scores.communities]
        codegraph = {
            "communities": communities,
            "outlier_communities": [communities[c] for c in scores.outlier_communities],
            "excluded_fraction": scores.excluded_fraction,
            "graph_edges": int(scores.graph.ecount()),
            "details": scores.summary,
        }
    return Report(
        volscan_version=volscan_version(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        input=source,
        output=str(Path(out_dir).resolve()),
        kind=kind,
        n_subjects=len(ids),
        summary={
            "method": plan.method,
            "features": {"backbone": given["backbone"],
                         "weights": given["weights"] or token_settings.get("weights", "none (no network)"),
                         "layers": token_settings.get("layers"), "proj_dim": token_settings.get("proj_dim"),
                         "size": plan.size, "grid": token_info["grid"],
                         "description": token_info.get("features", given["backbone"])},
            "flag_z": rule.z,  # the rule's (a --reference run's rule is the reference's)
            "flag_threshold": rule.threshold,
            "flag_rule": rule.describe(),
            "flagged": [e.id for e in entries if e.flagged],
        },
        settings=settings,
        warnings=([RANDOM_WEIGHTS_WARNING] if token_info["random_weights"] else []) + _mask_warnings(preprocess_info),
        preprocess=preprocess_info,
        tokens=token_info,
        scoring=scores.settings,
        token_grid=token_info["grid"],
        codegraph=codegraph,
        excluded_fraction=codegraph["excluded_fraction"] if codegraph else 0.0,
        subjects=entries,
    )


def write_run_tables(run_dir: Path, report: Report) -> None:
    """scores.csv, report.json and report.html of a run from its report, as one set
    (`atomic_write_texts`: `volscan evaluate` rewrites them in a finished run, and a crash must
    not leave report.html older than report.json)."""
    atomic_write_texts([(run_dir / SCORES_CSV, scores_csv_text(report_rows(report))),
                        (run_dir / REPORT_HTML, report_html(report)),
                        (run_dir / REPORT_JSON, report_json_text(report))])
