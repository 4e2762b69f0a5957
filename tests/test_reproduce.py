"""The BraTS-METS vs IXI reproduction on a miniature fake tree with the datasets' real naming."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.datasets import choose, find_brats_mets, find_ixi_t2
from pipelines.phantom import LesionSettings, PhantomConfig, WarpSettings, generate_cohort
from pipelines.reproduce import METRICS, PAPER_COMMUNITY_SIZES, PAPER_ROWS, paper_row, results_table, table_markdown
from volumetric.errors import InputFileError, VolscanError

REPRODUCE_MD = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"
IXI_NAMES = ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI035-IOP-0873", "IXI040-Guys-0724",
             "IXI105-HH-1471"]
BRATS_PRE = ["BraTS-MET-00001-000", "BraTS-MET-00004-000", "BraTS-MET-00010-000", "BraTS-MET-00013-000"]


@pytest.fixture(scope="module")
def fake_tree(tmp_path_factory, sri24_dir) -> dict[str, Path]:
    """IXI (warped, raw scanner grids) and BraTS-METS (template space, skull-stripped) trees from
    phantoms of the SRI-24 brain; their shared phantom template stands in for SRI-24 (small, fast)."""
    root = tmp_path_factory.mktemp("datasets")
    small = PhantomConfig(n_normal=len(IXI_NAMES), n_lesion=0, n_consistent=0, seed=11, size=40,
                          template=str(sri24_dir))  # explicit, so the tree is the same on every machine
    healthy = generate_cohort(root / "ph_ixi", small, progress=False)
    brats_cohort = generate_cohort(
        root / "ph_brats",
        replace(small, n_normal=0, n_lesion=len(BRATS_PRE) + 2,
                warps=WarpSettings(rotation_deg=0, scale_range=(1, 1), shift_mm=0, elastic_mm=0),
                lesions=LesionSettings(radius_mm=(14.0, 18.0))),
        progress=False)
    ixi = root / "IXI-T2"
    ixi.mkdir()
    for name, subject in zip(IXI_NAMES, healthy.subjects):
        shutil.copy(healthy.image(subject), ixi / f"{name}-T2.nii.gz")
    shutil.copy(healthy.image(healthy.subjects[0]), ixi / "IXI002-Guys-0828-PD.nii.gz")  # other contrast
    (ixi / "README.txt").write_text("not a scan", encoding="utf-8")
    brats = root / "MICCAI-LH-BraTS2025-MET-Challenge-Training"
    cases = BRATS_PRE + ["BraTS-MET-00001-001", "BraTS-MET-00020-000"]  # a follow-up, an unlabelled case
    for case, subject in zip(cases, brats_cohort.subjects):
        folder = brats / case
        folder.mkdir(parents=True)
        for suffix in ("t2w", "t1n"):
            shutil.copy(brats_cohort.image(subject), folder / f"{case}-{suffix}.nii.gz")
        if case != "BraTS-MET-00020-000":
            shutil.copy(brats_cohort.label(subject), folder / f"{case}-seg.nii.gz")
    return {"ixi": ixi, "brats": brats, "root": root, "template": brats_cohort.template_dir}


def test_ixi_discovery_parses_the_real_naming(fake_tree):
    scans = find_ixi_t2(fake_tree["root"])
    assert [s.id for s in scans] == sorted(f"{n}-T2" for n in IXI_NAMES)
    assert all(not s.registered and not s.skull_stripped and s.label is None and s.dataset == "IXI" for s in scans)
    with pytest.raises(InputFileError, match="does not exist"):
        find_ixi_t2(fake_tree["root"] / "nope")


def test_brats_discovery_keeps_labelled_pre_treatment_cases(fake_tree, tmp_path, caplog):
    scans = find_brats_mets(fake_tree["root"])
    assert [s.id for s in scans] == BRATS_PRE
    assert "no -seg file" in caplog.text
    for scan in scans:
        assert scan.registered and scan.skull_stripped and scan.image.name == f"{scan.id}-t2w.nii.gz"
        assert scan.label.name == f"{scan.id}-seg.nii.gz"
    with_followups = find_brats_mets(fake_tree["brats"], timepoints=r"\d{3}")
    assert "BraTS-MET-00001-001" in [s.id for s in with_followups] and len(with_followups) == len(BRATS_PRE) + 1
    listed = tmp_path / "cases.txt"
    listed.write_text("BraTS-MET-00004-000\nBraTS-MET-00001-001\n", encoding="utf-8")
    assert [s.id for s in find_brats_mets(fake_tree["brats"], case_list=listed)] == [
        "BraTS-MET-00001-001", "BraTS-MET-00004-000"]
    listed.write_text("BraTS-MET-00004-000\nIXI002\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="IXI002"):
        find_brats_mets(fake_tree["brats"], case_list=listed)
    listed.write_text("BraTS-MET-00020-000\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="no t2w \\+ seg"):
        find_brats_mets(fake_tree["brats"], case_list=listed)
    with pytest.raises(VolscanError, match="regular expression"):
        find_brats_mets(fake_tree["brats"], timepoints="(")


def test_seeded_choice_is_reproducible_and_order_free(fake_tree):
    scans = find_ixi_t2(fake_tree["ixi"])
    first = choose(scans, 4, seed=3, what="IXI")
    assert first == choose(list(reversed(scans)), 4, seed=3, what="IXI")
    assert [s.id for s in first] == sorted(s.id for s in first) and len({s.id for s in first}) == 4
    draws = {tuple(s.id for s in choose(scans, 4, seed=k, what="IXI")) for k in range(8)}
    assert len(draws) > 1
    # Reference: numpy's seeded permutation-free choice over the sorted candidates.
    expected = np.random.default_rng(3).choice(len(scans), 4, replace=False)
    assert [s.id for s in first] == sorted(sorted(s.id for s in scans)[i] for i in expected)
    with pytest.raises(VolscanError, match="found 6 usable scan"):
        choose(scans, 7, seed=0, what="IXI")


def test_paper_numbers_match_the_docs_table():
    """The constants in reproduce.py are the paper's table as docs/reproduce.md quotes it (with its source)."""
    text = REPRODUCE_MD.read_text(encoding="utf-8").split("## The paper's numbers")[1].split("\n## ")[0]
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    parsed = {(m.strip(), b.strip()): [float(v) for v in values] for m, b, *values in rows}
    assert len(parsed) == len(PAPER_ROWS)
    for row in PAPER_ROWS:
        assert parsed[(row["method"], row["backbone"])] == [row[m] for m in METRICS]
    assert "two anomalous communities (%d and %d volumes)" % PAPER_COMMUNITY_SIZES in " ".join(text.split())


def test_table_puts_ours_beside_the_papers():
    ours = {"codegraph": {"patient_auroc": 0.9, "f1_max": 0.8, "voxel_auroc": 0.95, "dice": None,
                          "communities": [3, 2]},
            "musc": {"patient_auroc": 0.85, "f1_max": 0.7, "voxel_auroc": 0.9, "dice": 0.5}}
    table = results_table(ours, {"backbone": "tiny", "weights": "random"})
    codegraph, musc = table["rows"]
    assert codegraph["method"] == "CoDeGraph" and musc["method"] == "MuSc"
    assert codegraph["patient_auroc"] == {"ours": 90.0, "paper": paper_row("codegraph")["patient_auroc"],
                                          "difference": round(90.0 - paper_row("codegraph")["patient_auroc"], 2)}
    assert codegraph["dice"]["ours"] is None and musc["dice"]["ours"] == 50.0
    text = table_markdown(table)
    assert "RANDOM" in text.upper() and "| CoDeGraph | tiny |" in text and "| MuSc | tiny |" in text
    assert f"{paper_row('musc')['dice']:.2f}" in text and "2 (3, 2; paper 13 + 34)" in text
    assert json.loads(json.dumps(table)) == table


def test_reproduce_command_end_to_end(fake_tree, tmp_path, capsys, tiny_vit_spec):
    """Seeded selection, per-dataset flags, both methods screened, the table beside the paper's."""
    from pipelines.cli import main

    spec = dict(tiny_vit_spec)
    config = tmp_path / "tiny.yaml"
    config.write_text("backbone_kwargs: {depth: %d, embed_dim: %d, num_heads: %d}\nproj_dim: 16\n"
                      % (spec["depth"], spec["embed_dim"], spec["num_heads"]))
    out = tmp_path / "repro"
    args = ["reproduce", "brats-mets-ixi", "--brats", str(fake_tree["brats"]), "--ixi", str(fake_tree["ixi"]),
            "-o", str(out), "--n-brats", "2", "--n-ixi", "3", "--seed", "1", "--backbone", spec["name"],
            "--weights", "random", "--size", "42", "--device", "cpu", "--template", str(fake_tree["template"]),
            "--cache", str(tmp_path / "cache"), "--config", str(config)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| CoDeGraph |" in printed and "| MuSc |" in printed and "table.md" in printed
    selection = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    chosen = [s["id"] for s in selection["scans"]]
    expected_ixi = [s.id for s in choose(find_ixi_t2(fake_tree["ixi"]), 3, seed=1, what="IXI")]
    expected_brats = [s.id for s in choose(find_brats_mets(fake_tree["brats"]), 2, seed=1, what="BraTS")]
    assert chosen == expected_ixi + expected_brats
    flags = {s["id"]: (s["registered"], s["skull_stripped"], s["label"] is None) for s in selection["scans"]}
    assert all(flags[i] == (False, False, True) for i in expected_ixi)
    assert all(flags[i] == (True, True, False) for i in expected_brats)
    table = json.loads((out / "table.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in table["rows"]] == ["CoDeGraph", "MuSc"]
    for row, method in zip(table["rows"], ("codegraph", "musc")):
        report = json.loads((out / method / "report.json").read_text(encoding="utf-8"))
        assert report["n_subjects"] == 5 and report["settings"]["method"] == method
        assert row["patient_auroc"]["ours"] == pytest.approx(100 * report["metrics"]["patient_auroc"], abs=0.01)
        assert row["patient_auroc"]["paper"] == paper_row(method)["patient_auroc"]
        assert all(row[m]["paper"] == paper_row(method)[m] for m in METRICS)
    assert "communities" in table["rows"][0] and table["settings"]["weights"] == "random"
    assert table["settings"]["bias_correction"] == "none" and table["settings"]["brain_mask"] == "auto"
    markdown = (out / "table.md").read_text(encoding="utf-8")
    assert "RANDOM" in markdown.upper() and "99.96" in markdown and "97.34" in markdown
    # The inputs are untouched and a second run refuses to overwrite.
    assert sorted(p.name for p in fake_tree["ixi"].iterdir()) == sorted(
        [f"{n}-T2.nii.gz" for n in IXI_NAMES] + ["IXI002-Guys-0828-PD.nii.gz", "README.txt"])
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(args[:5] + [str(tmp_path / "empty")] + args[6:] + ["--force"]) == 2
    assert "found 0 usable scan" in capsys.readouterr().err


def test_reproduce_reports_a_settings_typo_first(tmp_path, capsys):
    """No data folders, an OUT that exists: the backbone typo is still the error reported."""
    from pipelines.cli import main

    (tmp_path / "out").mkdir()
    assert main(["reproduce", "brats-mets-ixi", "--brats", str(tmp_path / "no-brats"), "--ixi", str(tmp_path / "no-ixi"),
                 "-o", str(tmp_path / "out"), "--backbone", "dinov3_vitx"]) == 2
    assert "unknown backbone 'dinov3_vitx'" in capsys.readouterr().err
