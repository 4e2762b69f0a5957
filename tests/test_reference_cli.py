"""`volscan screen/score NEW --reference RUN [--independent]` end to end on test_screen's tiny
cohort (eight 32^3 volumes, tiny random ViT, cube 28): 6 reference scans, 2 new ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_screen import screen_setup

from pipelines.cli import main
from pipelines.reference import ReferenceRequest, open_reference
from volumetric.errors import VolscanError


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    """The cohort split into reference/ (6) and new/ (2) folders, and the reference run."""
    setup = screen_setup(tmp_path_factory.mktemp("reference"), tiny_vit_spec)
    root = setup["root"]
    images = sorted(setup["images"].iterdir())
    folders = {"reference": images[:6], "new": images[6:], "one": images[6:7]}
    for name, files in folders.items():
        (root / name).mkdir()
        for path in files:
            shutil.copy(path, root / name / path.name)
    settings = setup["base"][1:]  # everything but the input folder
    assert main(["screen", str(root / "reference"), *settings, "-o", str(root / "run")]) == 0
    return {"root": root, "settings": settings, "run": root / "run"}


def screen(split: dict, folder: str, out: str, *extra: str, command: str = "screen") -> int:
    return main([command, str(split["root"] / folder), *split["settings"], "-o", str(split["root"] / "runs" / out),
                 *extra])


def report(split: dict, out: str) -> dict:
    folder = split["run"] if out == "run" else split["root"] / "runs" / out
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_new_scans_are_scored_on_the_reference_scale(split: dict) -> None:
    assert screen(split, "new", "new", "--reference", str(split["run"])) == 0
    new, ref = report(split, "new"), report(split, "run")
    section = new["reference"]
    assert section["run"] == str(split["run"].resolve()) and section["scans"] == 6
    assert [r["cohort"] for r in section["scans_by_score"]].count("new") == 2
    assert [r["cohort"] for r in section["scans_by_score"]].count("reference") == 6
    # The reference scans' scores are updated with the new scans as partners; their own run's kept apart.
    assert section["reference_scores"].startswith("updated with the new scans")
    rows = [r for r in section["scans_by_score"] if r["cohort"] == "reference"]
    own = {s["id"]: s["score"] for s in ref["subjects"]}
    assert {r["id"]: r["own_run_score"] for r in rows} == pytest.approx(own, rel=1e-6)
    assert any(abs(r["score"] - r["own_run_score"]) > 1e-6 for r in rows)
    reference_scores = np.array([r["score"] for r in rows])
    for entry in new["subjects"]:  # percentile among the reference scans' (updated) scores
        below = (reference_scores < entry["score"]).sum() + 0.5 * (reference_scores == entry["score"]).sum()
        assert entry["percentile"] == pytest.approx(round(100.0 * below / 6, 1))
        assert entry["flagged"] == (entry["score"] > new["summary"]["flag_threshold"])
    assert all(r["flagged"] == (r["score"] > new["summary"]["flag_threshold"]) for r in rows)
    assert "Reference cohort" in (split["root"] / "runs" / "new" / "report.html").read_text(encoding="utf-8")
    assert not (split["root"] / "runs" / "new" / "cohort.npz").exists()  # a reference-mode run is no reference
    assert "against the tokens of the 6 scans of a reference run and the other new scans" in new["methods"]
    assert "recomputed with the new scans among their partners" in new["methods"]


def test_reference_run_is_never_replaced_and_mood_scale_is_refused(split: dict, capsys) -> None:
    """`-o RUN --force --reference RUN` would replace the run being read; `--export mood` would
    scale the new scans over themselves, not on the reference's scale: both one line, no work."""
    argv = ["screen", str(split["root"] / "new"), *split["settings"], "--reference", str(split["run"])]
    assert main([*argv, "-o", str(split["run"]), "--force"]) == 2
    assert "output folder would replace the input" in capsys.readouterr().err
    assert (split["run"] / "cohort.npz").is_file()
    assert main([*argv, "-o", str(split["root"] / "runs" / "mood"), "--export", "mood"]) == 2
    assert "--export mood scales the scores over the screened scans" in capsys.readouterr().err
    assert not (split["root"] / "runs" / "mood").exists()


def test_independent_score_does_not_depend_on_the_other_new_scans(split: dict) -> None:
    assert screen(split, "new", "both", "--reference", str(split["run"]), "--independent") == 0
    assert screen(split, "one", "alone", "--reference", str(split["run"]), "--independent") == 0
    both = {s["id"]: s["score"] for s in report(split, "both")["subjects"]}
    (alone,) = report(split, "alone")["subjects"]
    # --independent: the reference scans keep their own run's scores, and its flag rule
    rows = [r for r in report(split, "both")["reference"]["scans_by_score"] if r["cohort"] == "reference"]
    assert all(r["score"] == r["own_run_score"] for r in rows)
    assert report(split, "both")["summary"]["flag_rule"] == report(split, "run")["summary"]["flag_rule"]
    # Equal up to fp32 rounding: the GEMM distances are blocked by batch, and the engine's fp32
    # results agree with float64 to ~1e-5 (the engine test checks the mode against its reference).
    assert alone["score"] == pytest.approx(both[alone["id"]], rel=1e-4)


def test_score_command_takes_a_reference_from_the_cache(split: dict) -> None:
    assert screen(split, "new", "scored", "--reference", str(split["run"]), command="score") == 0
    screened = ({s["id"]: s["score"] for s in report(split, "new")["subjects"]}
                if (split["root"] / "runs" / "new").exists() else None)
    scored = {s["id"]: s["score"] for s in report(split, "scored")["subjects"]}
    assert len(scored) == 2
    if screened is not None:
        assert scored == pytest.approx(screened, rel=1e-6)


def test_cohort_record_holds_keys_and_exclusions(split: dict) -> None:
    run = open_reference(ReferenceRequest(split["run"]))
    assert len(run.ids) == len(run.token_keys) == 6
    assert run.excluded is not None and run.excluded.shape[0] == 6  # CoDeGraph (the default method)
    assert all(t is not None for t in run.tokens())
    # per view (2 layers x 3 LNAMD radii) each valid element's K smallest minima, K = k of a batch of 12
    valid = int(sum((~t.void).sum() for t in run.tokens()))
    assert run.minima.shape == (6, valid, 1) and run.minima.dtype == np.float32  # f = 0.1: k(12) = 1
    assert np.isfinite(run.minima).all()
    assert open_reference(ReferenceRequest(split["run"], independent=True)).minima is None  # not read


def test_more_new_scans_than_the_kept_minima_serve_are_refused(split: dict) -> None:
    from pipelines.screen_config import ScreenConfig

    run = open_reference(ReferenceRequest(split["run"]))
    scoring = ScreenConfig().scoring_config("cpu", "3d")
    run.check_new_count(14, "codegraph", scoring)  # K = 1 = k(12) serves up to k(6 + q) = 1: q <= 14
    with pytest.raises(VolscanError, match="update its scores for at most 14 new scans at once, got 15"):
        run.check_new_count(15, "codegraph", scoring)
    open_reference(ReferenceRequest(split["run"], independent=True)).check_new_count(15, "codegraph", scoring)


def test_a_reference_without_kept_minima_is_refused_in_one_line(split: dict, capsys) -> None:
    """A cohort.npz of the older format (no kept minima): refused unless --independent."""
    from volumetric.hashing import file_sha256

    old = split["root"] / "old-run"
    shutil.copytree(split["run"], old)
    with np.load(old / "cohort.npz") as data:
        arrays = {name: data[name] for name in data.files if name not in ("minima", "format")}
    np.savez_compressed(old / "cohort.npz", **arrays)
    # nor the CoDeGraph settings added since (graph-only: a reference screen builds no graph)
    report = json.loads((old / "report.json").read_text(encoding="utf-8"))
    for key in ("max_dependent_share", "final_fraction", "unflagged_fraction"):
        del report["scoring"]["codegraph"][key]
    (old / "report.json").write_text(json.dumps(report), encoding="utf-8")
    marker = json.loads((old / "volscan-run.json").read_text(encoding="utf-8"))
    marker["checksums"]["cohort.npz"] = file_sha256(old / "cohort.npz")
    marker["checksums"]["report.json"] = file_sha256(old / "report.json")
    (old / "volscan-run.json").write_text(json.dumps(marker), encoding="utf-8")
    assert screen(split, "new", "from-old", "--reference", str(old)) == 2
    err = capsys.readouterr().err
    assert "holds no kept minima" in err and "an older volscan wrote it (format 1)" in err and "--independent" in err
    assert not (split["root"] / "runs" / "from-old").exists()
    assert screen(split, "new", "from-old", "--reference", str(old), "--independent") == 0


@pytest.mark.parametrize("extra, words", [
    (["--size", "42"], "token setting 'size' differs (reference 28, this run 42)"),
    (["--method", "musc"], "method differs (reference \"codegraph\", this run \"musc\")"),
    (["--proj-dim", "4"], "token setting 'proj_dim' differs"),
])
def test_a_different_setting_is_one_line_before_any_work(split: dict, capsys, extra: list, words: str) -> None:
    assert screen(split, "new", "bad", "--reference", str(split["run"]), *extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("volscan screen: error: --reference ") and words in errors[0], errors
    assert not (split["root"] / "runs" / "bad").exists()


def test_refusals(split: dict, capsys) -> None:
    assert screen(split, "new", "bad", "--independent") == 2
    assert "--independent applies to --reference RUN only" in capsys.readouterr().err
    assert screen(split, "new", "new2", "--reference", str(split["root"] / "missing")) == 2
    assert "folder does not exist" in capsys.readouterr().err
    assert screen(split, "one", "chain", "--reference", str(split["run"])) == 0
    assert screen(split, "one", "bad", "--reference", str(split["root"] / "runs" / "chain")) == 2
    assert "cohort.npz: missing" in capsys.readouterr().err
    assert screen(split, "reference", "same", "--reference", str(split["run"])) == 2
    assert "is the same image as reference scan" in capsys.readouterr().err
