"""The methods paragraph (report.json / report.html) and references.bib: it names what ran (not
the defaults), cites only what ran, and every citation has its BibTeX entry."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from test_screen import screen_setup

from pipelines.cli import main
from pipelines.methods_text import cited_keys, methods_paragraph, references
from pipelines.report import Report
from preprocessing.template import BUNDLED_SRI24_DIR


def _report(**settings: object) -> Report:
    """A raw-scan 3D report as a run with DINOv2 weights from a file, HD-BET and N4 writes it."""
    base = {"size": 224, "template": str(BUNDLED_SRI24_DIR), "registered": False, "skull_stripped": False,
            "bias_correction": "auto (n4)", "brain_mask_used": {"hd-bet": ["a", "b"], "deepbet": ["c"]},
            "preprocess": {"landmarks": None}}
    return Report(
        volscan_version="0.1.0", kind="3d", n_subjects=3, settings=base | settings,
        summary={"method": "codegraph", "flag_rule": "anomaly score above 1", "features": {
            "backbone": "vit_large_patch14_dinov2.lvd142m", "description": "ViT tokens"}},
        tokens={"random_weights": False, "features": "ViT tokens of vit_large (weights file:abc123)"},
        token_grid=[16, 16, 16],
        scoring={"lnamd_radii": [1, 3, 5], "codegraph": {"top_fraction": 0.1, "reference_fraction": 0.3, "iqr_k": 3.0}},
    )


def test_paragraph_names_the_cube_edge_of_a_finer_grid() -> None:
    assert "averaged over 14-slice blocks" in methods_paragraph(_report()) and "upsampled" not in methods_paragraph(_report())
    fine = _report()
    fine.tokens["settings"] = {"patch": 7}
    fine.token_grid = [32, 32, 32]
    text = methods_paragraph(fine)
    assert "slices upsampled so that each patch covers 7 voxels) and averaged over 7-slice blocks into a 32x32x32" in text


def test_paragraph_cites_what_ran() -> None:
    text = methods_paragraph(_report())
    assert f"PyTorch {version('torch')}" in text and "volscan 0.1.0" in text
    assert "weights file:abc123" in text and "224^3 cube" in text and "16x16x16 token grid" in text
    assert "HD-BET [isensee2019hdbet] (version" in text and "for 2 scan(s)" in text
    assert "deepbet [fisch2024deepbet]" in text and "N4 [tustison2010n4]" in text
    assert "f = 0.1, reference fraction 0.3" in text and "diffuse" not in text
    diffuse = _report()
    diffuse.scoring["codegraph"] |= {"max_dependent_share": 0.8, "final_fraction": 0.3}
    text_diffuse = methods_paragraph(diffuse)
    assert "f = 0.1, final pass f = 0.3, reference fraction 0.3" in text_diffuse
    assert "in more than 80 % of their tokens were set aside as diffuse" in text_diffuse
    assert cited_keys(text) == ["rohlfing2010sri24", "nyul2000standardization", "tustison2010n4", "isensee2019hdbet",
                                "fisch2024deepbet", "oquab2024dinov2", "li2024musc", "legia2025codegraph"]
    # Registered, skull-stripped inputs with another template and no N4: none of those cited.
    other = methods_paragraph(_report(registered=True, template="/data/tpl", bias_correction="auto (off)",
                                      brain_mask_used={"nonzero": ["a", "b", "c"]}))
    assert "given already registered to the template /data/tpl" in other
    assert not {"rohlfing2010sri24", "tustison2010n4", "isensee2019hdbet"} & set(cited_keys(other))


def test_bibtex_entries_are_well_formed() -> None:
    assert len(references()) == 8
    for key, entry in references().items():
        assert re.match(r"@(article|inproceedings)\{(\w+),\n", entry).group(2) == key
        assert entry.count("{") == entry.count("}")
        assert re.search(r"\byear\s*=\s*\{\d{4}\}", entry)
        assert re.search(r"\b(doi|eprint|journal)\s*=", entry)


@pytest.fixture(scope="module")
def classical_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> Path:
    setup = screen_setup(tmp_path_factory.mktemp("methods"), tiny_vit_spec)
    out = setup["root"] / "run"
    config = setup["root"] / "classical.yaml"
    config.write_text(f"cache: {setup['root'] / 'cache'}\ndevice: cpu\nsize: 28\ntokenizer: {{void_fraction: 0.1}}\n",
                      encoding="utf-8")
    assert main(["screen", str(setup["images"]), "--config", str(config), "--template", str(setup["template"]),
                 "--registered", "--skull-stripped", "--backbone", "classical", "--method", "musc",
                 "-o", str(out)]) == 0
    return out


def test_run_writes_paragraph_and_the_entries_it_cites(classical_run: Path) -> None:
    report = json.loads((classical_run / "report.json").read_text(encoding="utf-8"))
    text = report["methods"]
    assert "weights-free intensity and texture statistics" in text and "oquab2024dinov2" not in text
    assert "mutual scoring [li2024musc]" in text and "CoDeGraph" not in text and "f = 0.3" in text
    bib = (classical_run / "references.bib").read_text(encoding="utf-8")
    assert re.findall(r"^@\w+\{(\w+),", bib, flags=re.M) == cited_keys(text) == ["nyul2000standardization",
                                                                                  "li2024musc"]
    page = (classical_run / "report.html").read_text(encoding="utf-8")
    assert "Methods (to cite)" in page and "href='references.bib'" in page
    # `volscan evaluate` keeps the paragraph (report.json is read back into a Report).
    assert Report.from_dict(report).methods == text
