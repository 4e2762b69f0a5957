"""The report's "Reference cohort" section of a `--reference` run (`pipelines.reference`)."""

from __future__ import annotations

import html
from typing import Any


def reference_html(reference: dict[str, Any] | None) -> list[str]:
    """The report's "Reference cohort" section: the run, the rule, new and reference scans apart."""
    if not reference:
        return []
    esc = html.escape
    mode = ("each new scan against the reference alone (--independent)" if reference["independent"]
            else "new scans against the reference and each other")
    parts = ["<h2>Reference cohort</h2>",
             f"<p>Scored against the {reference['scans']} scans of <code>{esc(reference['run'])}</code>: {esc(mode)}"
             + (f"; CoDeGraph exclusions {esc(reference['codegraph_exclusions'])}" if reference["codegraph_exclusions"]
                else "") + f". Reference scans' scores: {esc(reference['reference_scores'])}. Percentile: share of "
             f"reference scans scoring lower. Flag rule (the reference scans' scores): {esc(reference['flag_rule'])}.</p>",
             "<table><tr><th>cohort</th><th>id</th><th>score</th><th>score in its own run</th>"
             "<th>percentile of reference</th><th>flagged</th></tr>"]
    parts += [f"<tr><td>{'<b>new</b>' if r['cohort'] == 'new' else 'reference'}</td><td>{esc(r['id'])}</td>"
              f"<td>{r['score']:.5g}</td><td>{_own(r)}</td><td>{r['percentile']}</td>"
              f"<td>{'yes' if r['flagged'] else ''}</td></tr>" for r in reference["scans_by_score"]]
    parts.append("</table>")
    return parts


def _own(row: dict[str, Any]) -> str:
    """A reference scan's score in its own run (blank for new scans)."""
    return f"{row['own_run_score']:.5g}" if "own_run_score" in row else ""
