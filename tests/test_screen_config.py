"""Screen settings: config file (YAML/TOML) + CLI precedence, clear errors; input discovery;
the atomic output folder; the CSV / HTML writers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipelines.subjects import discover_subjects
from pipelines.run_folder import AtomicOutputDir
from pipelines.report import (
    Report,
    ScanEntry,
    rank_scores,
    read_scores_csv,
    scores_csv_text,
    write_scores_csv,
)
from pipelines.report_html import report_html
from pipelines.screen_config import ScreenConfig, read_config_file, resolve_config
from volumetric.errors import InputFileError, VolscanError


def test_precedence_defaults_file_flags(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: musc\nproj-dim: 16\nsize: 42\nscoring:\n  lnamd-radii: [1, 3]\nlayers: 2\n", encoding="utf-8")
    config = resolve_config(yaml_file, size=56, method=None)
    assert config.method == "musc"  # file
    assert config.size == 56  # flag beats file
    assert config.proj_dim == 16 and config.layers == [2]
    assert config.scoring == {"lnamd_radii": [1, 3]}
    assert config.seed == 0 and config.top == ScreenConfig().top  # defaults
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('registered = true\n[backbone_kwargs]\ndepth = 2\n', encoding="utf-8")
    config = resolve_config(toml_file, registered=False)
    assert config.registered is False and config.backbone_kwargs == {"depth": 2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sizee: 28\n", "unknown setting 'sizee'"),
        ("size: twenty\n", "'size' must be an integer"),
        ("registered: maybe\n", "'registered' must be true or false"),
        ("layers: [1, two]\n", "'layers' must be a list of integers"),
        ("scoring: 3\n", "'scoring' must be a table"),
        ("- a\n- b\n", "must hold a mapping"),
        ("size: [\n", "cannot parse"),
    ],
)
def test_config_file_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError, match=message) as info:
        read_config_file(path)
    assert str(path) in str(info.value)


def test_setting_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(VolscanError, match="multiple of 14"):
        ScreenConfig(size=30)
    with pytest.raises(VolscanError, match="method"):
        ScreenConfig(method="patchcore")
    with pytest.raises(VolscanError, match="proj-dim"):
        resolve_config(None, proj_dim=0)
    with pytest.raises(InputFileError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
    other = tmp_path / "c.json"
    other.write_text("{}", encoding="utf-8")
    with pytest.raises(InputFileError, match=".yaml, .yml or .toml"):
        read_config_file(other)


def test_discovery_matches_labels_and_ignores_other_files(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("b.nii.gz", "a.nii"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 1), np.float32), np.eye(4)), str(images / name))
    (images / "README.txt").write_text("ignored", encoding="utf-8")
    (images / ".hidden.nii.gz").write_text("ignored", encoding="utf-8")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(labels / "b.nii.gz"))
    subjects, kind = discover_subjects(images, labels, registered=True)
    assert kind == "3d"
    assert [(s.id, s.label.name if s.label else None, s.registered) for s in subjects] == [
        ("a", None, True), ("b", "b.nii.gz", True)
    ]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(images / "a.nii.gz"))
    with pytest.raises(InputFileError, match="share the id 'a'"):
        discover_subjects(images)


def test_2d_label_size_mismatch(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(images / name)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(labels / "y.png")
    with pytest.raises(InputFileError, match="does not match") as info:
        discover_subjects(images, labels)
    assert str(labels / "y.png") in str(info.value)


def test_atomic_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError):
        with AtomicOutputDir(out) as work:
            (work / "half.txt").write_text("x", encoding="utf-8")
            raise RuntimeError("crash mid-run")
    assert not out.exists() and not list((tmp_path / "nested").iterdir())
    with AtomicOutputDir(out) as work:
        (work / "report.json").write_text("1", encoding="utf-8")
    assert (out / "report.json").read_text(encoding="utf-8") == "1"
    with pytest.raises(InputFileError, match="already exists"):
        AtomicOutputDir(out)
    with AtomicOutputDir(out, force=True) as work:
        (work / "report.json").write_text("2", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "volscan-run.json"]
    assert (out / "report.json").read_text(encoding="utf-8") == "2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    # --force never replaces a folder that is not a volscan run.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work", encoding="utf-8")
    with pytest.raises(InputFileError, match="not a previous volscan"):
        AtomicOutputDir(precious, force=True)
    assert (precious / "thesis.tex").read_text(encoding="utf-8") == "years of work"


def test_scores_csv_roundtrip_and_ties(tmp_path: Path) -> None:
    rows = rank_scores(["c", "a", "b"], [0.5, 0.9, 0.5], [1, 0, 1])
    assert [(r.id, r.rank) for r in rows] == [("a", 1), ("b", 2), ("c", 3)]
    assert scores_csv_text(rows).splitlines()[0] == "id,score,rank,label"
    write_scores_csv(tmp_path / "s.csv", rows)
    assert read_scores_csv(tmp_path / "s.csv") == rows
    unlabelled = rank_scores(["a", "b"], [1.0, 2.0])
    assert scores_csv_text(unlabelled).splitlines() == ["id,score,rank", "b,2,1", "a,1,2"]


def test_html_escapes_ids() -> None:
    entry = ScanEntry(id="<script>", rank=1, score=1.0, percentile=100.0, flagged=True, image="/in/x.png",
                      map="maps/x.tiff", map_files=["maps/x.tiff"],
                      hotspot={"voxel": [3, 4], "world_mm_ras": None, "region_voxels": 5})
    report = Report(
        input="in", kind="2d", n_subjects=1, created="now", warnings=["careful <b>"],
        summary={"method": "musc", "flag_z": 3.0, "flag_threshold": 2.0, "flagged": ["<script>"],
                 "features": {"backbone": "<b>", "description": "<b>", "weights": "random", "layers": [1],
                              "proj_dim": 8, "size": 28, "grid": [2, 2]}},
        settings={"method": "musc"}, subjects=[entry], timings_s={"scoring": 1.5},
    )
    page = report_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page and "careful &lt;b&gt;" in page
    assert "&lt;b&gt;" in page.split("<h2>")[0]  # the summary escapes too
    assert Report.from_dict(report.to_dict()) == report
    with pytest.raises(InputFileError, match="unknown report field 'colour'"):
        Report.from_dict({**report.to_dict(), "colour": 1}, "r.json")


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    path = folder / "screen.yaml"
    path.write_text("template: atlas\ncache: /abs/cache\nweights: random\n", encoding="utf-8")
    config = resolve_config(path)
    assert config.template == str(folder / "atlas")
    assert config.cache == "/abs/cache" and config.weights == "random"
    assert resolve_config(path, template="cli/atlas").template == "cli/atlas"


def test_stage_settings_are_typed_and_composed(tmp_path: Path) -> None:
    """Each stage gets its own frozen settings from the screen config, whole: every preprocessing
    option (margin_mm, cubic, registration) and every token option is reachable from a file."""
    from preprocessing.settings import PreprocessSettings
    from volumetric.tokens import TokenSettings

    path = tmp_path / "c.yaml"
    path.write_text("size: 42\nregistered: true\nlayers: [1, 2]\nproj-dim: 16\nprecision: fp32\n"
                    "preprocess: {margin_mm: 6, cubic: true, registration: {rigid_iterations: 5}}\n"
                    "tokenizer: {void_fraction: 0.2, slices_per_block: 3}\n", encoding="utf-8")
    config = resolve_config(path, seed=7)
    pre = config.preprocess_settings()
    assert isinstance(pre, PreprocessSettings) and pre.size == 42 and pre.registered is True
    assert pre.margin_mm == 6 and pre.cubic is True and pre.registration.rigid_iterations == 5
    tokens = config.token_settings("cpu")
    assert isinstance(tokens, TokenSettings) and tokens.layers == (1, 2) and tokens.proj_dim == 16
    assert tokens.seed == 7 and tokens.device == "cpu" and tokens.precision == "fp32"
    assert tokens.void_fraction == 0.2 and tokens.slices_per_block == 3
    assert config.outputs().flag_z == 3.0
    with pytest.raises(VolscanError, match="config 'tokenizer': unknown setting 'slice_per_block'"):
        ScreenConfig(tokenizer={"slice_per_block": 3}).token_settings()
    with pytest.raises(VolscanError, match="margn_mm"):
        ScreenConfig(preprocess={"margn_mm": 3}).preprocess_settings()


def test_window_flag_and_config_reach_the_engine(tmp_path: Path) -> None:
    """`window` from a config file's top level or its `scoring.engine` table, the flag winning."""
    path = tmp_path / "c.yaml"
    path.write_text("scoring: {engine: {window: 3}}\n", encoding="utf-8")
    assert resolve_config(path).scoring_config("cpu").engine.window == 3
    assert resolve_config(path, window=1).scoring_config("cpu").engine.window == 1
    (tmp_path / "top.toml").write_text("window = 2\n", encoding="utf-8")
    assert resolve_config(tmp_path / "top.toml").scoring_config("cpu").engine.window == 2
    assert resolve_config().scoring_config("cpu").engine.window is None
    with pytest.raises(VolscanError, match="window must be >= 0"):
        resolve_config(window=-1)
    with pytest.raises(VolscanError, match="'window' must be an integer"):
        resolve_config(window=1.5)
