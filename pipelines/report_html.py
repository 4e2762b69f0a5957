"""report.html: a run's `Report` rendered as one self-contained page.

Top-down: summary (flag rule, headline metrics), metrics, ranking, viewer, scan panels,
figures, CoDeGraph communities, settings as used, timings, glossary. The page links the PNG
figures and maps by relative path, so the run folder can be moved or zipped as a whole; links
are percent-encoded and escaped, text escaped (`pipelines.safe_text`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.methods_text import methods_html
from pipelines.reference_report import reference_html
from pipelines.report import Report, json_safe
from pipelines.run_layout import RunLayout
from pipelines.safe_text import href
from pipelines.viewer import ERROR_CAPTURE, viewer_html
from pipelines.viewer2d import viewer2d_html

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.92em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f3f3f3}.warn{background:#fde2e1;border:2px solid #c0392b;padding:.8em;font-weight:bold}
img{max-width:100%;margin:.3em 0}.num{text-align:right;font-variant-numeric:tabular-nums}
.summary{background:#f4f8fb;border:1px solid #bcd;padding:.6em 1em}.flag{color:#b00;font-weight:bold}
.small{font-size:.85em;color:#555}.vs-frame{width:100%;height:440px;background:#000}
dt{font-weight:bold;margin-top:.4em}dd{margin-left:1.5em}
table.wrap{table-layout:fixed;width:100%}table.wrap td{white-space:normal;overflow-wrap:anywhere}
table.wrap td:first-child{width:14em}.scroll{overflow-x:auto;max-width:100%}
"""

# Metric key -> (name shown, what it means). The Dice protocol is the paper's (pipelines.evaluate).
GLOSSARY: dict[str, tuple[str, str]] = {
    "n_scans": ("scans", "scans in the run"),
    "n_lesion_scans": ("lesion scans", "scans whose mask has at least one positive voxel"),
    "n_images": ("images", "images in the run"),
    "n_anomalous_images": ("anomalous images", "images whose mask has at least one positive pixel"),
    "patient_auroc": ("patient AUROC", "area under the ROC curve of the scan scores, lesion vs no-lesion scans "
                      "(0.5 = chance, 1 = every lesion scan above every healthy one)"),
    "patient_ap": ("patient AP", "average precision of the scan scores for finding the lesion scans"),
    "patient_f1_max": ("patient F1-max", "best F1 over all score thresholds, lesion vs no-lesion scans"),
    "patient_f1_threshold": ("patient F1 threshold", "the scan-score threshold giving patient F1-max"),
    "image_auroc": ("image AUROC", "ROC area of the image scores, anomalous vs normal images"),
    "image_ap": ("image AP", "average precision of the image scores"),
    "image_f1_max": ("image F1-max", "best F1 over all image-score thresholds"),
    "image_f1_threshold": ("image F1 threshold", "the image-score threshold giving image F1-max"),
    "grid_f1_max": ("token-grid F1-max", "best F1 of token scores against the masks pooled to the token grid "
                    "(a token is positive when any of its voxels is lesion), one threshold for every token of "
                    "every scan"),
    "dice_threshold": ("Dice threshold", "the token-score threshold of token-grid F1-max, used to binarise every "
                       "map for Dice"),
    "voxel_auroc": ("voxel AUROC", "ROC area of every voxel of every cube (template space, model resolution) "
                    "against the masks; background voxels included, which flatters it"),
    "voxel_auroc_error_bound": ("voxel AUROC error bound", "largest possible difference between the streamed "
                                "(histogram) voxel AUROC and the exact one"),
    "voxel_auroc_brain": ("voxel AUROC (brain)", "as voxel AUROC, inside the brain masks only"),
    "dice_mean_all": ("mean Dice (all scans)", "mean Dice over every scan; see the Dice protocol below"),
    "dice_mean_lesion": ("mean Dice (lesion scans)", "mean Dice over the scans with a lesion only"),
    "pixel_auroc": ("pixel AUROC", "ROC area of every pixel against the masks at model resolution"),
    "pixel_auroc_error_bound": ("pixel AUROC error bound", "largest difference between streamed and exact"),
    "pixel_ap": ("pixel AP", "average precision of the pixels"),
    "pixel_f1_max": ("pixel F1-max", "best F1 over pixel thresholds"),
    "aupro": ("AUPRO", "area under the per-region-overlap curve up to 30 % false positive rate, divided by 0.3 "
              "(MVTec AD / anomalib definition)"),
    "aupro_cflow": ("AUPRO (MuSc)", "the per-region-overlap area as MuSc reports it (cflow-ad's definition: 200 "
                    "thresholds, points with false positive rate below 30 % re-normalised to [0, 1]); it differs from "
                    "AUPRO for the same maps"),
}

DICE_PROTOCOL = (
    "Dice is computed per scan in the preprocessed cube (template space): the map is binarised at the Dice "
    "threshold (one number for the whole cohort, from token-grid F1-max) and compared with the mask brought "
    "into the cube. A scan without lesion whose binarised map is empty has Dice 1 (both empty: perfect "
    "agreement); a scan without lesion with any voxel above the threshold has Dice 0. That is why healthy "
    "scans show 1 or 0 and why 'mean Dice (lesion scans)' is the number to compare between methods."
)

TERMS = (
    ("score", "the scan's anomaly score: the highest token score of its map (the engine's collection score); "
              "higher = more unusual compared with the rest of this cohort"),
    ("percentile", "the scan's rank as a percentile of the cohort: 100 = most suspicious, 0 = least"),
    ("flagged", "score above the flag threshold = median + z x 1.4826 x MAD of the cohort's scores (a robust "
                "z-score); the same threshold outlines the above-threshold region in maps and panels"),
    ("hotspot", "the maximum of the scan's anomaly map inside its brain mask, on its own grid: world "
                "millimetres in RAS (as ITK-SNAP and 3D Slicer show them: x to the right, y anterior, z "
                "superior) and the voxel indices i, j, k of the input file (0-based)"),
    ("region", "voxels of the 26-connected above-threshold region holding the hotspot, and its volume"),
)
# The same terms for 2D images (no brain mask, no world coordinates).
TERMS_2D = (
    ("score", "the image's anomaly score: the highest token score of its map (the engine's collection score); "
              "higher = more unusual compared with the rest of this set"),
    ("percentile", "the image's rank as a percentile of the set: 100 = most suspicious, 0 = least"),
    ("flagged", TERMS[2][1]),
    ("hotspot", "the maximum of the image's anomaly map at the image's own size: pixel row and column (0-based, "
                "from the top-left corner)"),
    ("region", "pixels of the 8-connected above-threshold region holding the hotspot"),
)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, css_class: str = "") -> str:
    def cell(value: Any, tag: str) -> str:
        if isinstance(value, float):
            return f'<{tag} class="num">{value:.6g}</{tag}>'
        return f"<{tag}>{value if isinstance(value, _Raw) else html.escape(str(value))}</{tag}>"

    lines = [f"<table class='{css_class}'>" if css_class else "<table>"]
    if header:
        lines.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    lines += ["<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


class _Raw(str):
    """Already-escaped HTML (links) for `_table`."""


def _link(path: str, text: str) -> _Raw:
    return _Raw(f'<a href="{href(path)}">{html.escape(text)}</a>')


def _coords(values: Sequence[float] | None, digits: int = 1) -> str:
    return "" if values is None else ", ".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)


def _flag_rule(summary: dict[str, Any]) -> str:
    """The flag rule in words (`FlagRule.describe`); reports written before it was stored give
    their threshold and z."""
    if "flag_rule" in summary:
        return summary["flag_rule"]
    return f"anomaly score above {summary['flag_threshold']:.4g} = median + {summary['flag_z']:g} robust SD"


# Headline metrics shown in the summary box, in this order, when present.
HEADLINE_METRICS = ("patient_auroc", "patient_ap", "image_auroc", "image_ap", "voxel_auroc_brain", "pixel_auroc",
                    "dice_mean_lesion", "aupro")


def _summary(report: Report) -> list[str]:
    esc = html.escape
    summary = report.summary
    features = summary["features"]
    flagged = summary["flagged"]
    three_d = report.kind == "3d"
    scans = "scans" if three_d else "images"
    names = ", ".join(esc(i) for i in flagged[:10]) + (" ..." if len(flagged) > 10 else "")
    size = (f"cube {features['size']}<sup>3</sup>" if three_d
            else f"images resized to {features['size']} x {features['size']} pixels")
    # Why fewer scans may be flagged than the ranking puts on top: the flag is a cut on the
    # score's distance from the cohort's median, not a count of the top ranks.
    one = "a scan" if three_d else "an image"
    flag_rule = (f"rule: {esc(_flag_rule(summary))}. The ranking below orders every {scans[:-1]} by its score; {one} "
                 "is flagged only when its score stands out from the cohort's own spread by this rule, "
                 f"so {scans} ranked near the top can stay unflagged")
    lines = [
        "<div class='summary'>",
        f"<p><b>Cohort</b>: {report.n_subjects} {esc(report.kind.upper())} {scans} from "
        f"<code>{esc(report.input)}</code>.</p>",
        f"<p><b>Method</b>: {esc(summary['method'])} (training-free: each {scans[:-1]} is compared with all the "
        "others).</p>",
        f"<p><b>Features</b>: {esc(features['description'])}; {size}, token grid "
        f"{' x '.join(map(str, features['grid']))}.</p>",
        f"<p><b>Flagged as outliers of this cohort</b>: <span class='flag'>{len(flagged)} of {report.n_subjects}"
        f"</span> {scans}" + (f" ({names})" if flagged else "") + f"; {flag_rule}.</p>",
    ]
    metrics = report.metrics or {}
    shown = [(GLOSSARY[k][0], metrics[k]) for k in HEADLINE_METRICS if isinstance(metrics.get(k), (int, float))]
    if shown:
        lines.append("<p><b>Metrics</b> (against the masks given): "
                     + "; ".join(f"{esc(name)} {value:.3f}" for name, value in shown) + " (all metrics below).</p>")
    lines += [
        f"<p class='small'>Created {esc(report.created)} by volscan {esc(report.volscan_version)}; "
        f"run folder <code>{esc(report.output)}</code>.</p>",
        "</div>",
    ]
    return lines


def _ranking(report: Report) -> str:
    subjects = report.subjects
    extra = [key for key in ("brain_mask", "label", "dice") if any(getattr(s, key) is not None for s in subjects)]
    three_d = report.kind == "3d"
    header = ["rank", "id", "score", "percentile", "flagged",
              *(["hotspot RAS mm (x, y, z)", "voxel (i, j, k)"] if three_d else ["hotspot pixel (row, col)"]),
              "region (voxels / mm³)" if three_d else "region (pixels)"] + [k.replace("_", " ") for k in extra] + ["files"]
    rows = []
    for s in subjects:
        spot = s.hotspot
        files = [_link(s.map, "map")] + ([_link(s.panel, "panel")] if s.panel else [])
        rows.append(
            [s.rank, s.id, float(s.score), f"{s.percentile:.0f}", "yes" if s.flagged else "",
             *([_coords(spot.get("world_mm_ras"))] if three_d else []), _coords(spot.get("voxel")),
             f"{spot.get('region_voxels', '')}" + (f" / {spot['region_mm3']:g}" if spot.get("region_mm3") is not None
                                                   else "")]
            + [getattr(s, key) if getattr(s, key) is not None else "" for key in extra]
            + [_Raw(" ".join(files))]
        )
    return _table(rows, header)


def _communities(graph: dict[str, Any]) -> list[str]:
    """The community table: each community's density against its fence, and whether (and why)
    it is an outlier community (`volumetric.engine.codegraph`: density above the Tukey fence)."""
    outliers = {tuple(c) for c in graph["outlier_communities"]}
    details = graph.get("details") or {}
    densities, fences = details.get("densities"), details.get("density_fences")
    diffuse = set(details.get("diffuse_communities") or [])
    shares = details.get("dependent_shares") or {}
    rows = []
    for i, members in enumerate(graph["communities"]):
        outlier = tuple(members) in outliers
        row: list[Any] = [i, len(members)]
        if densities is not None and fences is not None:
            density, fence = float(densities[i]), fences[i]
            if i in diffuse:
                share = shares.get(str(i))
                why = ("no: set aside as diffuse (a whole-scan difference, not a focal anomaly"
                       + (f": its members depend on it in {100 * share:.0f} % of their tokens" if share is not None else "")
                       + "; not filtered, not in the fence's quartiles)")
            elif fence is None:
                why = "no (a single scan has no internal links)" if len(members) < 2 else "no (no fence: densities do not vary)"
            elif outlier:
                why = f"yes: density {density:.3g} > fence {fence:.3g}"
            else:
                why = f"no: density {density:.3g} <= fence {fence:.3g}"
            row += [density, "" if fence is None else float(fence), why]
        else:
            row.append("yes" if outlier else "")
        rows.append(row + [", ".join(members)])
    header = ["community", "scans"] + (["density", "fence", "outlier"] if densities is not None and fences is not None
                                       else ["outlier"]) + ["members"]
    return [
        f"<p>{len(graph['communities'])} communities of scans linked by shared suspicious tokens; "
        f"{len(graph['outlier_communities'])} outlier (consistent-anomaly) communities, whose members' "
        f"tokens were excluded from each other's references; excluded elements: "
        f"{100 * graph['excluded_fraction']:.3f} %. A community is an outlier when its density (the mean "
        "weight of the links a member keeps inside it) is above the fence, a Tukey far-out cut over the densities "
        "of all communities (third quartile + k x inter-quartile range): scans that share suspicious tokens far "
        "more than the rest of the cohort does. A dense community whose members' tokens depend on it almost "
        "everywhere (a site, a protocol or an anatomical variant shared by a subgroup: a whole-scan difference) is "
        "set aside as diffuse instead: nothing of it is excluded. A community below the fence may still hold the "
        "top-ranked scans: "
        "they are then ranked by mutual scoring alone, without excluding anything.</p>",
        _table(rows, header),
    ]


def report_html(report: Report) -> str:
    """The page a reader opens, top-down: summary (flag rule, headline metrics), metrics,
    ranking, viewer, scan panels, figures, CoDeGraph, settings as used, glossary."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>volscan screen: {esc(report.input)}</title><style>{_STYLE}</style>",
        ERROR_CAPTURE if report.viewer else "",
        "</head><body>",
        "<h1>volscan screen report</h1>",
    ]
    parts += [f"<p class='warn'>{esc(w)}</p>" for w in report.warnings]
    parts += _summary(report)
    metrics = report.metrics
    if metrics:
        parts.append("<h2>Metrics</h2>")
        parts.append(_table([[GLOSSARY.get(k, (k, ""))[0], v] for k, v in metrics.items()
                             if not isinstance(v, (dict, list))], ["metric", "value"]))
        parts += [f"<p class='small'>note: {esc(n)}</p>" for n in metrics.get("notes", [])]
    parts += ["<h2>Ranking</h2>", f"<div class='scroll'>{_ranking(report)}</div>"]
    parts += reference_html(report.reference)  # --reference: both cohorts apart
    if report.kind == "3d":
        parts.append("<p class='small'>To look in ITK-SNAP or 3D Slicer: open the scan, add its map "
                     "(<code>maps/&lt;id&gt;.nii.gz</code>, same grid) as an overlay, and type the hotspot's RAS "
                     "millimetres into the cursor box (or go to the voxel i, j, k).</p>")
    if report.viewer:
        parts += ["<h2>Viewer</h2>", (viewer_html if report.kind == "3d" else viewer2d_html)(RunLayout(Path(".")))]
    panels = [s for s in report.subjects if s.panel]
    if panels and report.kind == "3d":
        parts.append("<h2>Top-ranked scans</h2><p class='small'>Each scan in its own space (axes only reordered "
                     "to the closest RAS orientation, pixels at the voxel spacing), through its hotspot (green "
                     "crosshair); yellow: above-threshold region; cyan: mask.</p>")
    elif panels:
        parts.append("<h2>Top-ranked images</h2><p class='small'>Each image at its own size with its anomaly map "
                     "on the run's colour scale; cyan: mask.</p>")
    parts += [f"<figure><img src='{href(s.panel)}' alt='{esc(s.id)}'></figure>" for s in panels]
    figures = report.figures
    plots = {k: v for k, v in figures.items() if k != "community graph"}
    if plots:
        parts += [f"<figure><img src='{href(p)}' alt='{esc(name)}'><figcaption>{esc(name)}</figcaption></figure>"
                  for name, p in plots.items()]
    graph = report.codegraph
    if graph:
        parts.append("<h2>CoDeGraph communities</h2>")
        if "community graph" in figures:
            parts.append(f"<figure><img src='{href(figures['community graph'])}' alt='community graph'></figure>")
        parts += _communities(graph)
    parts += methods_html(report)
    parts.append("<h2>Settings as used</h2>")
    # None left after run-time resolution means the setting does not apply to this run
    # (e.g. layers with classical features, template for 2D images).
    parts.append(_table([[k, "(not used)" if v is None else json.dumps(json_safe(v))]
                         for k, v in report.settings.items()], ["setting", "value"], css_class="wrap"))
    parts.append("<h2>Timings</h2>")
    parts.append(_table([[k, float(v)] for k, v in report.timings_s.items()], ["stage", "seconds"]))
    parts.append("<h2>Glossary</h2><dl>")
    parts += [f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>"
              for term, text in (TERMS if report.kind == "3d" else TERMS_2D)]
    used = metrics or {}
    parts += [f"<dt>{esc(name)}</dt><dd>{esc(text)}</dd>" for key, (name, text) in GLOSSARY.items() if key in used]
    if "dice_mean_all" in used:
        parts.append(f"<dt>Dice protocol</dt><dd>{esc(DICE_PROTOCOL)}</dd>")
    parts.append("</dl>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
