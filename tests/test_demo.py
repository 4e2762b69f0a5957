"""`volscan demo`: offline, detects its lesions on classical features and says so; ViT one option away; safe outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

import pipelines.demo as demo
from pipelines.cli import main


@pytest.fixture()
def small_demo(monkeypatch, tmp_path):
    """The demo's own code path and regime (a third with look-alike lesions) on fewer, smaller subjects."""
    monkeypatch.setattr(demo, "DEMO_COHORT", replace(demo.DEMO_COHORT, n_normal=6, n_lookalike=3))
    monkeypatch.setenv("VOLSCAN_CACHE_DIR", str(tmp_path / "user-cache"))  # must stay unused
    monkeypatch.delenv("VOLSCAN_TEMPLATE", raising=False)


def _pairwise_auroc(lesion: list[float], healthy: list[float]) -> float:
    """Plain reference: the fraction of (lesion, healthy) pairs ranked the right way (ties count half)."""
    pairs = [(a > b) + 0.5 * (a == b) for a in lesion for b in healthy]
    return sum(pairs) / len(pairs)


def test_demo_ranks_lesion_scans_first_and_names_its_features(small_demo, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report_html = out / "screen" / "report.html"
    assert printed.rstrip().endswith(str(report_html)) and report_html.is_file()
    assert "RANDOM" not in printed.upper()
    data = json.loads((out / "screen" / "report.json").read_text(encoding="utf-8"))
    features = data["summary"]["features"]["description"]
    assert features.startswith("classical features (no neural network, no weights)")
    assert f"features: {features}" in printed and features in report_html.read_text(encoding="utf-8")
    assert data["warnings"] == [] and data["tokens"]["settings"]["backbone"] == "classical"
    cohort = json.loads((out / "cohort" / "cohort.json").read_text(encoding="utf-8"))
    groups = {sid: meta["group"] for sid, meta in cohort["subjects"].items()}
    scores = {s["id"]: s["score"] for s in data["subjects"]}
    assert set(scores) == set(groups) and sorted(set(groups.values())) == ["lookalike", "normal"]
    lesion = [scores[s] for s, g in groups.items() if g != "normal"]
    healthy = [scores[s] for s, g in groups.items() if g == "normal"]
    auroc = _pairwise_auroc(lesion, healthy)
    assert auroc >= 0.9, (auroc, sorted(scores.items(), key=lambda kv: -kv[1]))
    assert data["metrics"]["patient_auroc"] == pytest.approx(auroc)
    # Skull-stripped scans: every hotspot on a brain (non-zero) voxel, every map 0 off the brain.
    for entry in data["subjects"]:
        scan = np.asarray(nib.load(entry["image"]).dataobj)
        stored = np.asarray(nib.load(str(out / "screen" / entry["map"])).dataobj)
        assert scan[tuple(entry["hotspot"]["voxel"])] != 0, entry
        assert not stored[scan == 0].any(), entry["id"]
    assert not (tmp_path / "user-cache").exists() and (out / "cache").is_dir()


def test_demo_vit_path_is_one_option_away_and_loud_about_random_weights(small_demo, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "DEMO_COHORT", replace(demo.DEMO_COHORT, n_normal=3, n_lookalike=1, size=40))
    monkeypatch.setattr(demo, "DEMO_CUBE", 42)
    out = tmp_path / "vit"
    assert main(["demo", "-o", str(out), "--device", "cpu", "--vit"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "features: ViT tokens of vit_small_patch14_dinov2" in printed
    data = json.loads((out / "screen" / "report.json").read_text(encoding="utf-8"))
    assert any("RANDOM" in w.upper() for w in data["warnings"])
    assert "RANDOM" in (out / "screen" / "report.html").read_text(encoding="utf-8").upper()
    # A second run refuses to overwrite; --force replaces only a previous demo.
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep", encoding="utf-8")
    assert main(["demo", "-o", str(other), "--force"]) == 2
    assert (other / "thesis.tex").read_text(encoding="utf-8") == "keep"


def test_classical_demo_refuses_vit_options_before_any_work(small_demo, tmp_path, capsys):
    out = tmp_path / "refused"
    assert main(["demo", "-o", str(out), "--backbone", "classical", "--weights", str(tmp_path / "w.pth")]) == 2
    assert "classical" in capsys.readouterr().err and not out.exists()


def test_demo_reports_a_settings_typo_first_and_refuses_random_weights_for_classical(small_demo, tmp_path, capsys):
    (tmp_path / "taken").mkdir()  # an OUT that would be refused too: the typo is named first
    assert main(["demo", "-o", str(tmp_path / "taken"), "--backbone", "dinov3_vitx"]) == 2
    assert "unknown backbone 'dinov3_vitx'" in capsys.readouterr().err
    out = tmp_path / "classical"
    assert main(["demo", "-o", str(out), "--backbone", "classical", "--weights", "random"]) == 2
    assert "weights applies only to ViT backbones" in capsys.readouterr().err and not out.exists()


def test_an_interrupted_demo_is_marked_unfinished(small_demo, monkeypatch, tmp_path):
    from pipelines.run_folder import read_run_marker

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill leaves on disk: the demo stops inside the screen

    monkeypatch.setattr("pipelines.screen.run_screen", killed)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, progress=False)
    assert read_run_marker(out)["complete"] is False
