"""Writing and reading a run's tables and reports: scores.csv, report.json, report.html.

`report.json` is the machine-readable record (settings, timings per stage, ranking, CoDeGraph
communities, excluded-element share, metrics, figure paths); `report.html` renders the same
dictionary as one self-contained page that links the PNG figures and maps by relative path,
so the run folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.outputs import atomic_write_text
from volumetric.errors import InputFileError

SCORES_CSV = "scores.csv"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RANDOM_WEIGHTS_WARNING = (
    "Backbone weights are RANDOM: scores and maps are meaningless on real data "
    "(use --weights PATH or the default pretrained DINOv2 weights)."
)


@dataclass(frozen=True)
class ScoreRow:
    """One line of scores.csv: rank 1 = most suspicious; `label` None when unknown."""

    id: str
    score: float
    rank: int
    label: int | None = None


def rank_scores(ids: Sequence[str], scores: Sequence[float], labels: Sequence[int] | None = None) -> list[ScoreRow]:
    """Rows sorted by descending score (ties broken by id, so the order is reproducible)."""
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))
    return [
        ScoreRow(ids[i], float(scores[i]), rank + 1, None if labels is None else int(labels[i]))
        for rank, i in enumerate(order)
    ]


def scores_csv_text(rows: Sequence[ScoreRow]) -> str:
    """`id,score,rank` (+ `label` when every row has one) as CSV text."""
    with_label = bool(rows) and all(row.label is not None for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "score", "rank"] + (["label"] if with_label else []))
    for row in rows:
        writer.writerow([row.id, f"{row.score:.9g}", row.rank] + ([row.label] if with_label else []))
    return buffer.getvalue()


def write_scores_csv(path: Path, rows: Sequence[ScoreRow]) -> None:
    """Atomically write scores.csv."""
    atomic_write_text(path, scores_csv_text(rows))


def read_scores_csv(path: Path) -> list[ScoreRow]:
    """Rows of an existing scores.csv, in file order."""
    if not path.is_file():
        raise InputFileError(path, "not found; is this a volscan screen output folder?")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"id", "score", "rank"} <= set(reader.fieldnames):
            raise InputFileError(path, "expected columns id,score,rank")
        try:
            return [
                ScoreRow(r["id"], float(r["score"]), int(r["rank"]), int(r["label"]) if r.get("label") else None)
                for r in reader
            ]
        except ValueError as exc:
            raise InputFileError(path, f"malformed row ({exc})") from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_report_json(path: Path, report: dict[str, Any]) -> None:
    """Atomically write the report dictionary as indented JSON (NaN/inf become null)."""
    atomic_write_text(path, json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")


def read_report_json(path: Path) -> dict[str, Any]:
    """Load report.json of an existing run."""
    if not path.is_file():
        raise InputFileError(path, "not found; is this a volscan screen output folder?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"not valid JSON ({exc})") from None


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.warn{background:#fde2e1;border:2px solid #c0392b;padding:.8em;font-weight:bold}
img{max-width:100%;margin:.3em 0}.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    def cell(value: Any, tag: str) -> str:
        if isinstance(value, float):
            return f'<{tag} class="num">{value:.6g}</{tag}>'
        return f"<{tag}>{value if isinstance(value, _Raw) else html.escape(str(value))}</{tag}>"

    lines = ["<table>"]
    if header:
        lines.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    lines += ["<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


class _Raw(str):
    """Already-escaped HTML (links) for `_table`."""


def _link(href: str, text: str) -> _Raw:
    return _Raw(f'<a href="{html.escape(href)}">{html.escape(text)}</a>')


def report_html(report: dict[str, Any]) -> str:
    """Self-contained HTML page for a report dictionary (as written to report.json)."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>volscan screen: {esc(str(report.get('input', '')))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>volscan screen report</h1><p>{report.get('n_subjects')} {esc(str(report.get('kind')))} inputs from "
        f"<code>{esc(str(report.get('input')))}</code>, method <b>{esc(str(report['settings']['method']))}</b>, "
        f"created {esc(str(report.get('created')))}.</p>",
    ]
    parts += [f"<p class='warn'>{esc(w)}</p>" for w in report.get("warnings", [])]
    tokens = report.get("tokens")
    if tokens:
        parts.append(
            f"<p>Token grid {' x '.join(map(str, report.get('token_grid', [])))}; tokens extracted for "
            f"{tokens['computed']} input(s), {tokens['cached']} from the cache (<code>{esc(str(tokens['cache']))}</code>).</p>"
        )
    metrics = report.get("metrics")
    if metrics:
        parts.append("<h2>Metrics</h2>")
        parts.append(_table([[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list))], ["metric", "value"]))
    figures = report.get("figures", {})
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [
            f"<figure><img src='{esc(p)}' alt='{esc(name)}'><figcaption>{esc(name)}</figcaption></figure>"
            for name, p in figures.items()
        ]
    parts.append("<h2>Ranking</h2>")
    extra = [key for key in ("label", "dice") if any(s.get(key) is not None for s in report["subjects"])]
    rows = [
        [s["rank"], s["id"], float(s["score"])]
        + [s.get(key) if s.get(key) is not None else "" for key in extra]
        + [_link(s["map"], "map") if s.get("map") else ""]
        for s in report["subjects"]
    ]
    parts.append(_table(rows, ["rank", "id", "score", *extra, "anomaly map"]))
    graph = report.get("codegraph")
    if graph:
        parts.append("<h2>CoDeGraph</h2>")
        parts.append(
            f"<p>{len(graph['communities'])} communities; {len(graph['outlier_communities'])} outlier "
            f"(consistent-anomaly) communities; excluded elements: {100 * graph['excluded_fraction']:.3f} %.</p>"
        )
        parts.append(
            _table([[i, ", ".join(c)] for i, c in enumerate(graph["outlier_communities"])], ["outlier community", "members"])
        )
    parts.append("<h2>Timings</h2>")
    parts.append(_table([[k, float(v)] for k, v in report.get("timings_s", {}).items()], ["stage", "seconds"]))
    parts.append("<h2>Settings</h2>")
    parts.append(_table([[k, json.dumps(_json_safe(v))] for k, v in report["settings"].items()], ["setting", "value"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report_html(path: Path, report: dict[str, Any]) -> None:
    """Atomically write report.html for `report`."""
    atomic_write_text(path, report_html(report))


def report_rows(report: dict[str, Any]) -> list[ScoreRow]:
    """The ranking of a report dictionary as `ScoreRow`s, in report order."""
    return [ScoreRow(s["id"], s["score"], s["rank"], s.get("label")) for s in report["subjects"]]


def write_run_tables(run_dir: Path, report: dict[str, Any]) -> None:
    """scores.csv, report.json and report.html of a run from its report dictionary."""
    write_scores_csv(run_dir / SCORES_CSV, report_rows(report))
    write_report_json(run_dir / REPORT_JSON, report)
    write_report_html(run_dir / REPORT_HTML, report)
