"""BIDS in and out: `volscan screen BIDS_ROOT`, `volscan bids ... participant|group` writing BIDS
Derivatives checked against the naming rules `pipelines.bids_derivatives` cites, and the
one-line refusals of a bad dataset or selection.

The dataset (tests/bids_dataset.py): three participants x two sessions, T1w and T2w, one
session with two T1w runs and one T1w with an `acq` entity; 32^3 volumes, tiny random ViT,
cube 28, `--registered --skull-stripped` (test_screen's settings).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids_dataset import LESION_ID, T1W_IDS, make_bids_dataset
from test_screen import make_template, write_config

from pipelines.bids import BidsSelection, find_scans, parse_name
from pipelines.bids_derivatives import check_derivative_names
from pipelines.cli import main
from volumetric.errors import InputFileError, VolscanError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    root = tmp_path_factory.mktemp("bids")
    ds = make_bids_dataset(root / "ds")
    template = make_template(root / "template")
    config = write_config(root / "config.yaml", tiny_vit_spec, root / "cache")
    settings = ["--config", str(config), "--template", str(template), "--registered", "--skull-stripped"]
    return {"root": root, "ds": ds, "settings": settings}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _csv(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["id"]: row["score"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def derivatives(dataset: dict) -> dict:
    """`volscan bids` participant then group, for T1w and then T2w, into the dataset's
    derivatives/volscan; the dataset's files before, and what the group runs printed."""
    ds, out, settings = dataset["ds"], dataset["ds"] / "derivatives" / "volscan", dataset["settings"]
    before = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    for suffix in ("T1w", "T2w"):
        assert main(["bids", str(ds), str(out), "participant", "--bids-suffix", suffix, *settings]) == 0
        assert main(["bids", str(ds), str(out), "group", "--bids-suffix", suffix, *settings]) == 0
    return {"out": out, "before": before}


def test_bids_app_participant_then_group_writes_bids_derivatives(dataset: dict, derivatives: dict) -> None:
    ds, out = dataset["ds"], derivatives["out"]
    for suffix in ("T1w", "T2w"):  # the group level computed nothing: the participant level did
        report = json.loads((out / "volscan" / suffix / "report.json").read_text(encoding="utf-8"))
        assert report["tokens"]["computed"] == 0
    assert check_derivative_names(out) == []
    # Nothing was written into the dataset itself, outside its derivatives folder.
    assert sorted(p.relative_to(ds) for p in ds.rglob("*") if "derivatives" not in p.parts) == \
        [p for p in derivatives["before"] if "derivatives" not in p.parts]
    description = json.loads((out / "dataset_description.json").read_text(encoding="utf-8"))
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "volscan"
    assert description["SourceDatasets"][0]["URL"] == ds.resolve().as_uri()
    assert description["DatasetLinks"]["raw"] == ds.resolve().as_uri()
    t1w = _rows(out / "desc-scores_T1w.tsv")
    assert sorted(r["scan_id"] for r in t1w) == T1W_IDS
    assert {(r["participant_id"], r["session_id"]) for r in t1w} == \
        {(i.split("_")[0], i.split("_")[1]) for i in T1W_IDS}
    assert len(_rows(out / "desc-scores_T2w.tsv")) == 4  # sub-03 has no T2w
    columns = json.loads((out / "desc-scores_T1w.json").read_text(encoding="utf-8"))
    assert list(columns) == list(t1w[0])  # every column described, in order
    scores = _csv(out / "volscan" / "T1w" / "scores.csv")
    for row in t1w:
        assert row["score"] == scores[row["scan_id"]]
        source = ds / row["source"].removeprefix("bids:raw:")
        derived = nib.load(str(out / row["map"]))
        assert derived.shape == nib.load(str(source)).shape
        np.testing.assert_allclose(derived.affine, nib.load(str(source)).affine)
        sidecar = json.loads((out / row["map"].replace(".nii.gz", ".json")).read_text(encoding="utf-8"))
        assert sidecar["SpatialReference"] == sidecar["Sources"][0] == row["source"]
    assert t1w[0]["scan_id"] == LESION_ID and t1w[0]["flagged"] == "true"
    run2 = out / "sub-03" / "ses-02" / "anat" / "sub-03_ses-02_run-2_space-T1w_desc-anomaly_map.nii.gz"
    assert run2.is_file()
    assert (out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_space-T2w_desc-anomaly_map.nii.gz").is_file()
    assert (out / ".bidsignore").read_text(encoding="utf-8") == "volscan/\n"


def test_derivative_check_finds_broken_names(derivatives: dict, tmp_path: Path) -> None:
    """The naming check can fail: a raw name, entities out of order, a missing sidecar, a file
    in the wrong folder and a table without its sidecar are each reported."""
    copy = tmp_path / "copy"
    shutil.copytree(derivatives["out"], copy, ignore=shutil.ignore_patterns("volscan"))
    anat = copy / "sub-01" / "ses-01" / "anat"
    source = anat / "sub-01_ses-01_space-T1w_desc-anomaly_map.nii.gz"
    shutil.copy(source, anat / "sub-01_ses-01_T1w.nii.gz")
    shutil.copy(source, anat / "sub-01_ses-01_desc-anomaly_space-T1w_map.nii.gz")
    shutil.copy(source, copy / "sub-02" / "ses-02" / "anat" / "sub-02_ses-01_space-T1w_desc-anomaly_map.nii.gz")
    (copy / "desc-scores_T2w.json").unlink()
    problems = "\n".join(check_derivative_names(copy))
    assert "sub-01_ses-01_T1w.nii.gz: a permissible raw name" in problems
    assert "entity 'space' comes after 'desc'" in problems
    assert "sub-02_ses-01_space-T1w_desc-anomaly_map.nii.gz: expected in sub-02/ses-01/anat/" in problems
    assert "no JSON sidecar" in problems and "desc-scores_T2w.tsv: no JSON sidecar" in problems


def test_screen_reads_a_bids_root_with_suffix_and_participants(dataset: dict) -> None:
    out = dataset["root"] / "screen-t2w"
    assert main(["screen", str(dataset["ds"]), "-o", str(out), "--bids-suffix", "T2w", "--participant-label", "01",
                 "sub-02", *dataset["settings"]]) == 0
    assert sorted(_csv(out / "scores.csv")) == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01", "sub-02_ses-02"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert all(s["image"].endswith("_T2w.nii.gz") for s in report["subjects"])


def test_bids_names_are_read_by_the_entity_rules(tmp_path: Path) -> None:
    entities, suffix, extension = parse_name(Path("sub-01_ses-2_acq-fast_run-10_T1w.nii.gz"))
    assert entities == {"sub": "01", "ses": "2", "acq": "fast", "run": "10"} and suffix == "T1w"
    assert extension == ".nii.gz"
    for name, problem in [("sub-01_run-1_ses-01_T1w.nii", "entity 'ses' comes after 'run'"),
                          ("sub-01_run-a_T1w.nii", "must be an index"), ("sub-01_acq-a.b_T1w.nii", "must be a label"),
                          ("ses-01_sub-01_T1w.nii", "comes after"), ("sub-01_foo-1_T1w.nii", "entity 'foo' is not"),
                          ("sub-01_run-1_run-2_T1w.nii", "appears twice"), ("sub-01_x_T1w.nii", "is not an entity")]:
        with pytest.raises(InputFileError, match=problem):
            parse_name(Path(name))
    assert BidsSelection("FLAIR", ("sub-01", "01", "02")).participants == ("01", "02")
    with pytest.raises(VolscanError, match="not a BIDS label"):
        BidsSelection("T1w", ("0_1",))


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1  # one clear line, no traceback
    return lines[0]


def test_bad_bids_inputs_are_one_line_errors(dataset: dict, tmp_path: Path, capsys) -> None:
    ds, settings = dataset["ds"], dataset["settings"]
    out = str(tmp_path / "out")
    assert "no folder sub-09 (participants: 01, 02, 03)" in _error(
        ["screen", str(ds), "-o", out, "--participant-label", "09", *settings], capsys)
    assert "not a BIDS label" in _error(["screen", str(ds), "-o", out, "--participant-label", "sub-0.1", *settings],
                                        capsys)
    assert "holds no sub-*/[ses-*/]anat/*_FLAIR.nii[.gz] scan" in _error(
        ["screen", str(ds), "-o", out, "--bids-suffix", "FLAIR", *settings], capsys)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not a BIDS dataset root (no dataset_description.json)" in _error(
        ["screen", str(plain), "-o", out, "--bids-suffix", "T2w", *settings], capsys)
    # Two files with one id (.nii beside .nii.gz), and a misnamed file, in a copy of the dataset.
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy, ignore=shutil.ignore_patterns("derivatives"))
    anat = copy / "sub-01" / "ses-01" / "anat"
    image = nib.load(str(anat / "sub-01_ses-01_T1w.nii.gz"))
    nib.save(image, str(anat / "sub-01_ses-01_T1w.nii"))
    assert "two files map to the scan id 'sub-01_ses-01'" in _error(["screen", str(copy), "-o", out, *settings],
                                                                    capsys)
    (anat / "sub-01_ses-01_T1w.nii").rename(anat / "sub-01_ses-02_T1w.nii")
    assert "do not match its folder sub-01/ses-01" in _error(["screen", str(copy), "-o", out, *settings], capsys)
    # The output may not overlap the dataset, except under its derivatives folder.
    assert "overlaps the BIDS input" in _error(["bids", str(ds), str(ds / "sub-01" / "x"), "group", *settings],
                                               capsys)
    assert "--participant-label belongs to the participant level" in _error(
        ["bids", str(ds), str(tmp_path / "d"), "group", "--participant-label", "01", *settings], capsys)
    # Each level's options are refused at the other level, not accepted and dropped.
    assert "--window, --export belong(s) to the group level" in _error(
        ["bids", str(ds), str(tmp_path / "d"), "participant", "--window", "1", "--export", "mood", *settings], capsys)
    assert "--stage belongs to the participant level" in _error(
        ["bids", str(ds), str(tmp_path / "d"), "group", "--stage", "spatial", *settings], capsys)


def test_participant_level_by_participant_goes_stage_by_stage(dataset: dict, tmp_path: Path, capsys) -> None:
    """With learned landmarks a run for some participants needs the three steps; done so, the
    group level finds every scan and matches a screen of the whole dataset."""
    ds, settings = dataset["ds"], dataset["settings"]
    cache = tmp_path / "cache"
    mine = [*settings, "--cache", str(cache), "--bids-suffix", "T2w"]
    out = tmp_path / "derivatives"
    assert "needs three steps" in _error(["bids", str(ds), str(out), "participant", "--participant-label", "01",
                                          *mine], capsys)
    for labels in (["01"], ["02", "03"]):
        assert main(["bids", str(ds), str(out), "participant", "--participant-label", *labels, "--stage", "spatial",
                     *mine]) == 0
    assert main(["bids", str(ds), str(out), "participant", "--stage", "landmarks", *mine]) == 0
    for labels in (["01"], ["02", "03"]):
        assert main(["bids", str(ds), str(out), "participant", "--participant-label", *labels, "--stage", "tokens",
                     *mine]) == 0
    assert main(["bids", str(ds), str(out), "group", *mine]) == 0
    screen = tmp_path / "screen"
    assert main(["screen", str(ds), "-o", str(screen), "--bids-suffix", "T2w", *settings]) == 0
    assert _csv(out / "volscan" / "T2w" / "scores.csv") == _csv(screen / "scores.csv")


def test_find_scans_sorts_ids_and_keeps_every_entity(dataset: dict) -> None:
    scans = find_scans(dataset["ds"], BidsSelection("T1w"))
    assert [s.id for s in scans] == T1W_IDS
    assert scans[-1].relative == "sub-03/ses-02/anat/sub-03_ses-02_run-2_T1w.nii.gz"
