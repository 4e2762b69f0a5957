"""`volscan demo`: offline end to end on a shrunken cohort, loud about random weights, safe outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import pipelines.demo as demo
from pipelines.cli import main


@pytest.fixture()
def small_demo(monkeypatch):
    """The demo's own code path with fewer, smaller subjects and a 42^3 cube (test budget)."""
    monkeypatch.setattr(demo, "DEMO_COHORT", replace(demo.DEMO_COHORT, n_normal=3, n_lesion=1, n_consistent=2, size=40))
    monkeypatch.setattr(demo, "DEMO_CUBE", 42)


def test_demo_runs_offline_and_points_at_the_report(small_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VOLSCAN_CACHE_DIR", str(tmp_path / "user-cache"))  # must stay unused
    monkeypatch.delenv("VOLSCAN_TEMPLATE", raising=False)
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = out / "screen" / "report.html"
    assert printed.rstrip().endswith(str(report)) and report.is_file()
    assert "RANDOM" in printed
    data = json.loads((out / "screen" / "report.json").read_text(encoding="utf-8"))
    assert data["n_subjects"] == 6 and any("RANDOM" in w.upper() for w in data["warnings"])
    assert data["metrics"]["patient_auroc"] is not None
    assert "RANDOM" in report.read_text(encoding="utf-8").upper()
    cohort = json.loads((out / "cohort" / "cohort.json").read_text(encoding="utf-8"))
    assert {s["id"] for s in data["subjects"]} == set(cohort["subjects"])
    assert not (tmp_path / "user-cache").exists() and (out / "cache").is_dir()
    # A second run refuses to overwrite; --force replaces only a previous demo.
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep", encoding="utf-8")
    assert main(["demo", "-o", str(other), "--force"]) == 2
    assert (other / "thesis.tex").read_text(encoding="utf-8") == "keep"
