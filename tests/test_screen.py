"""`volscan screen` / `volscan evaluate` end to end on a tiny 3D cohort made here.

Eight 32^3 volumes (ellipsoid "brain" + noise) in the world space of a procedural template,
three with a bright sphere lesion and its mask, one with an empty mask; two inputs are stored
with other voxel orders / grids so native-space maps are really checked. Tiny random ViT from
the config file, cube 28 (token grid 2^3), `--registered --skull-stripped`.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.cli import main
from pipelines.evaluate import RunElements
from pipelines.maps import upsample_scores

SHAPE = (32, 32, 32)
WORLD = np.array([[1.0, 0, 0, -16], [0, 1.0, 0, -16], [0, 0, 1.0, -16], [0, 0, 0, 1]])
LESIONS = {"case02": (-4.0, 3.0, 2.0), "case05": (5.0, -3.0, -2.0), "case07": (0.0, 4.0, 4.0)}
N_SUBJECTS = 8


def _world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _brain(world: np.ndarray) -> np.ndarray:
    return ((world / np.array([12.0, 10.0, 11.0])) ** 2).sum(-1) <= 1


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_template(folder: Path) -> Path:
    """`template.nii.gz` + `brain_mask.nii.gz`: a smooth ellipsoid brain in WORLD space."""
    folder.mkdir(parents=True)
    world = _world_grid(WORLD, SHAPE)
    brain = _brain(world)
    image = np.where(brain, 80 + 20 * np.cos(world[..., 0] / 3), 0).astype(np.float32)
    _save(image, WORLD, folder / "template.nii.gz")
    _save(brain.astype(np.uint8), WORLD, folder / "brain_mask.nii.gz")
    return folder


def _affine_for(index: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Most inputs on the template grid; one flipped (LAS), one on a larger shifted grid."""
    if index == 3:
        flip = WORLD.copy()
        flip[0, 0], flip[0, 3] = -1.0, 15.0
        return flip, SHAPE
    if index == 6:
        shifted = WORLD.copy()
        shifted[:3, 3] -= 2.0
        return shifted, (36, 34, 35)
    return WORLD, SHAPE


def make_cohort(root: Path, seed: int = 0) -> tuple[Path, Path, dict[str, bool]]:
    """Images folder, labels folder and {id: has lesion}."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    truth = {}
    for i in range(N_SUBJECTS):
        sid = f"case{i:02d}"
        affine, shape = _affine_for(i)
        world = _world_grid(affine, shape)
        brain = _brain(world)
        image = np.where(brain, 80 + 20 * np.cos(world[..., 0] / 3) + rng.normal(0, 4, shape), 0)
        lesion = np.zeros(shape, dtype=bool)
        if sid in LESIONS:
            lesion = (((world - np.array(LESIONS[sid])) ** 2).sum(-1) <= 9) & brain
            image[lesion] = 250
        _save(image.astype(np.float32), affine, images / f"{sid}.nii.gz")
        if sid in LESIONS or i == 1:  # case01 has an empty mask: healthy
            _save(lesion.astype(np.uint8), affine, labels / f"{sid}.nii.gz")
        truth[sid] = bool(lesion.any())
    return images, labels, truth


def write_config(path: Path, tiny_vit_spec: dict, cache: Path, **extra: object) -> Path:
    """YAML config with the tiny random ViT and small cube."""
    spec = dict(tiny_vit_spec)
    lines = [
        f"backbone: {spec.pop('name')}",
        "weights: random",
        "size: 28",
        "proj-dim: 8",
        f"cache: {cache}",
        "device: cpu",
        "top: 3",
        "backbone_kwargs: " + json.dumps(spec),
        # 2^3 tokens: each octant of the cube is only ~15 % brain, so lower the void cut.
        "tokenizer: {void_fraction: 0.1}",
    ] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def screen_setup(root: Path, tiny_vit_spec: dict, cache: str = "cache") -> dict:
    """The synthetic cohort, its template and tiny-ViT config under `root`, and `base`: the
    `volscan screen` arguments for them (input, config, template, already registered and stripped)."""
    images, labels, truth = make_cohort(root)
    template = make_template(root / "template")
    config = write_config(root / "config.yaml", tiny_vit_spec, root / cache)
    base = [str(images), "--config", str(config), "--template", str(template), "--registered", "--skull-stripped"]
    return {"root": root, "images": images, "labels": labels, "truth": truth, "template": template,
            "config": config, "base": base}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    return screen_setup(tmp_path_factory.mktemp("screen3d"), tiny_vit_spec)


@pytest.fixture(scope="module")
def labelled_run(cohort: dict) -> dict:
    out = cohort["root"] / "run"
    code = main(["screen", *cohort["base"], "--labels", str(cohort["labels"]), "-o", str(out)])
    assert code == 0
    return {"out": out, "report": json.loads((out / "report.json").read_text(encoding="utf-8"))}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_csv_ranks_and_labels(cohort: dict, labelled_run: dict) -> None:
    rows = _csv(labelled_run["out"] / "scores.csv")
    assert list(rows[0]) == ["id", "score", "rank", "label"]
    assert sorted(r["id"] for r in rows) == sorted(cohort["truth"])
    scores = [float(r["score"]) for r in rows]
    assert [int(r["rank"]) for r in rows] == list(range(1, N_SUBJECTS + 1))
    assert scores == sorted(scores, reverse=True)
    assert all(np.isfinite(scores))
    assert {r["id"]: bool(int(r["label"])) for r in rows} == cohort["truth"]


def test_maps_are_on_each_input_grid(cohort: dict, labelled_run: dict) -> None:
    for sid in cohort["truth"]:
        source = nib.load(str(cohort["images"] / f"{sid}.nii.gz"))
        amap = nib.load(str(labelled_run["out"] / "maps" / f"{sid}.nii.gz"))
        assert amap.shape == source.shape
        np.testing.assert_allclose(amap.affine, source.affine, atol=1e-6)
        assert amap.get_data_dtype() == np.float32
        data = np.asarray(amap.dataobj)
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 0


def test_map_follows_world_coordinates_not_voxel_order(cohort: dict, labelled_run: dict) -> None:
    """case03 is stored flipped along x: its map must be the flip of a same-grid map's layout."""
    out = labelled_run["out"]
    elements = RunElements.load(out / "elements.npz")
    i = elements.ids.index("case03")
    cube = upsample_scores(elements.element_scores[i], elements.size)
    native = np.asarray(nib.load(str(out / "maps" / "case03.nii.gz")).dataobj)
    # Cube voxel -> template world (WORLD grid) -> flipped input voxel: x_in = 31 - x_template.
    mapping = json.loads((out / "mappings" / "case03.json").read_text(encoding="utf-8"))
    cube_affine = np.array(mapping["cube_affine"])
    centre = np.array([14.0, 14.0, 14.0, 1.0])
    world = cube_affine @ centre
    input_voxel = np.linalg.inv(np.array(mapping["native_affine"])) @ world
    x, y, z = np.round(input_voxel[:3]).astype(int)
    assert native[x, y, z] == pytest.approx(cube[14, 14, 14], rel=0.05, abs=1e-3)


def test_report_json_fields(cohort: dict, labelled_run: dict) -> None:
    report = labelled_run["report"]
    assert report["kind"] == "3d" and report["n_subjects"] == N_SUBJECTS
    settings = report["settings"]
    assert settings["method"] == "codegraph" and settings["size"] == 28 and settings["proj_dim"] == 8
    assert settings["layers"] == report["tokens"]["settings"]["layers"] and settings["layers"]  # resolved, not null
    assert settings["registered"] is True and settings["skull_stripped"] is True
    # resolved, not null: the default "auto" is off for registered, skull-stripped inputs
    assert settings["preprocess"]["bias_correction"] == "auto" and settings["bias_correction"] == "auto (off)"
    assert settings["backbone_kwargs"] == {"depth": 3, "embed_dim": 48, "num_heads": 2}
    assert set(report["timings_s"]) >= {"inputs", "preprocess", "tokens", "scoring", "maps", "metrics", "figures"}
    assert all(v >= 0 for v in report["timings_s"].values())
    assert report["token_grid"] == [2, 2, 2]
    assert any("RANDOM" in w for w in report["warnings"])
    graph = report["codegraph"]
    members = sorted(i for community in graph["communities"] for i in community)
    assert members == sorted(cohort["truth"])
    assert 0.0 <= graph["excluded_fraction"] <= 1.0
    assert report["excluded_fraction"] == graph["excluded_fraction"]
    metrics = report["metrics"]
    for key in ("patient_auroc", "patient_ap", "patient_f1_max", "voxel_auroc", "voxel_auroc_brain",
                "dice_mean_all", "dice_mean_lesion"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_scans"] == N_SUBJECTS and metrics["n_lesion_scans"] == len(LESIONS)
    scores = {s["id"]: s["score"] for s in report["subjects"]}
    ids = sorted(scores)
    expected = roc_auc_score([cohort["truth"][i] for i in ids], [scores[i] for i in ids])
    assert metrics["patient_auroc"] == pytest.approx(expected)


def test_report_dice_matches_reference_protocol(cohort: dict, labelled_run: dict) -> None:
    """Re-derive the paper's Dice from elements.npz + masks with plain numpy."""
    out = labelled_run["out"]
    elements = RunElements.load(out / "elements.npz")
    from preprocessing.native_mapping import NativeMapping

    grid_scores, grid_truth, cubes = [], [], []
    for i, sid in enumerate(elements.ids):
        label_path = cohort["labels"] / f"{sid}.nii.gz"
        mapping = NativeMapping.load(out / "mappings" / f"{sid}.json")
        native = np.asarray(nib.load(str(label_path)).dataobj) > 0 if label_path.exists() else np.zeros(mapping.native_shape, bool)
        cube = mapping.to_cube(native.astype(np.float32), order=0) > 0.5
        cubes.append(cube)
        grid_truth.append(cube.reshape(2, 14, 2, 14, 2, 14).any(axis=(1, 3, 5)))
        grid_scores.append(np.nan_to_num(elements.element_scores[i]))
    s, t = np.ravel(grid_scores), np.ravel(grid_truth)
    best_f1, best_threshold = -1.0, None
    for threshold in np.unique(s):
        predicted = s >= threshold
        tp = np.sum(predicted & t)
        f1 = 2 * tp / (predicted.sum() + t.sum())
        if f1 > best_f1:
            best_f1, best_threshold = f1, threshold
    dices = []
    for i, cube in enumerate(cubes):
        predicted = upsample_scores(elements.element_scores[i], 28) >= best_threshold
        denominator = predicted.sum() + cube.sum()
        dices.append(1.0 if denominator == 0 else 2 * np.sum(predicted & cube) / denominator)
    metrics = labelled_run["report"]["metrics"]
    assert metrics["grid_f1_max"] == pytest.approx(best_f1)
    assert metrics["dice_mean_all"] == pytest.approx(np.mean(dices))
    lesion = [d for d, sid in zip(dices, elements.ids) if cohort["truth"][sid]]
    assert metrics["dice_mean_lesion"] == pytest.approx(np.mean(lesion))


def test_html_and_figures(labelled_run: dict) -> None:
    out, report = labelled_run["out"], labelled_run["report"]
    page = (out / "report.html").read_text(encoding="utf-8")
    figures = report["figures"]
    assert {"ROC curve", "score histogram", "community graph"} <= set(figures)
    panels = [s["panel"] for s in report["subjects"] if s.get("panel")]
    assert len(panels) == 3 and [s["rank"] for s in report["subjects"] if s.get("panel")] == [1, 2, 3]
    for relative in [*figures.values(), *panels]:
        assert f"src='{relative}'" in page
        assert (out / relative).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RANDOM" in page
    for sid in ("case00", "case07"):
        assert f'href="maps/{sid}.nii.gz"' in page
    assert not list(out.parent.glob(".run.partial-*"))


def test_rerun_reuses_cached_tokens_and_evaluate_matches(cohort: dict, labelled_run: dict, capsys) -> None:
    out = cohort["root"] / "run_nolabels"
    assert main(["screen", *cohort["base"], "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"report: {out / 'report.html'}" in printed.out
    assert "RANDOM" in printed.err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["tokens"]["computed"] == 0 and report["tokens"]["cached"] == N_SUBJECTS
    assert report["metrics"] is None and list(_csv(out / "scores.csv")[0]) == ["id", "score", "rank"]
    first = {s["id"]: s["score"] for s in labelled_run["report"]["subjects"]}
    assert {s["id"]: s["score"] for s in report["subjects"]} == pytest.approx(first)

    assert main(["evaluate", str(out), "--labels", str(cohort["labels"])]) == 0
    evaluated = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key, value in labelled_run["report"]["metrics"].items():
        if isinstance(value, float):
            assert evaluated["metrics"][key] == pytest.approx(value), key
    assert list(_csv(out / "scores.csv")[0]) == ["id", "score", "rank", "label"]
    assert (out / "figures" / "roc.png").is_file()
    # Again with the same masks folder: its own metrics, recomputed without --force.
    assert main(["evaluate", str(out), "--labels", str(cohort["labels"])]) == 0
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["metrics"] == evaluated["metrics"]
    # Other masks would replace metrics computed against these: --force.
    other = Path(shutil.copytree(cohort["labels"], cohort["root"] / "other-labels"))
    capsys.readouterr()
    assert main(["evaluate", str(out), "--labels", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(cohort["labels"].resolve()) in err and str(other.resolve()) in err
    assert main(["evaluate", str(out), "--labels", str(other), "--force"]) == 0


def test_evaluate_after_screen_with_labels_needs_no_force(cohort: dict, labelled_run: dict, tmp_path: Path) -> None:
    """The README's sequence: `screen --labels masks/`, then `evaluate --labels masks/`."""
    out = Path(shutil.copytree(labelled_run["out"], tmp_path / "run"))
    assert labelled_run["report"]["settings"]["labels"] == str(cohort["labels"].resolve())
    assert main(["evaluate", str(out), "--labels", str(cohort["labels"])]) == 0
    again = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key, value in labelled_run["report"]["metrics"].items():
        if isinstance(value, float):
            assert again["metrics"][key] == pytest.approx(value), key


def test_position_aware_screen_reuses_the_tokens(cohort: dict, labelled_run: dict) -> None:
    """`--window 0`: every token compared with the same cell of the other scans only."""
    out = cohort["root"] / "run_window"
    assert main(["screen", *cohort["base"], "--window", "0", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["window"] == 0 and report["tokens"]["cached"] == N_SUBJECTS
    scores = [s["score"] for s in report["subjects"]]
    assert len(scores) == N_SUBJECTS and all(np.isfinite(scores))


def test_classical_tokens_on_a_grid_twice_as_fine_with_a_window(cohort: dict) -> None:
    """7-voxel classical cubes (a 4^3 grid at cube 28) scored within one cell: the maps, scores and
    metrics follow the finer grid."""
    config = cohort["root"] / "classical7.yaml"
    config.write_text(f"backbone: classical\nsize: 28\ncache: {cohort['root'] / 'cache7'}\ndevice: cpu\ntop: 3\n"
                      "tokenizer: {patch: 7, void_fraction: 0.1}\n", encoding="utf-8")
    out = cohort["root"] / "run_classical7"
    base = [str(cohort["images"]), "--config", str(config), "--template", str(cohort["template"]), "--registered",
            "--skull-stripped", "--window", "1", "--labels", str(cohort["labels"]), "-o", str(out)]
    assert main(["screen", *base]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["window"] == 1 and report["tokens"]["settings"]["patch"] == 7
    assert report["metrics"]["patient_auroc"] >= 0.0
    image = nib.load(str(cohort["images"] / "case06.nii.gz"))
    assert nib.load(str(out / "maps" / "case06.nii.gz")).shape == image.shape


def test_vit_tokens_on_a_grid_twice_as_fine(cohort: dict, tiny_vit_spec: dict, capsys) -> None:
    """The ViT path's 7-voxel cubes (slices upsampled 2x, 7-slice blocks: a 4^3 grid at cube 28)
    through `volscan screen` with a window; a cube edge the 14-pixel patch cannot reach is one line."""
    spec = dict(tiny_vit_spec)
    name = spec.pop("name")
    config = cohort["root"] / "vit7.yaml"
    for patch, out in ((7, cohort["root"] / "run_vit7"), (5, cohort["root"] / "run_vit5")):
        config.write_text(f"backbone: {name}\nweights: random\nsize: 28\nproj-dim: 8\n"
                          f"cache: {cohort['root'] / 'cache_vit7'}\ndevice: cpu\ntop: 3\n"
                          f"backbone_kwargs: {json.dumps(spec)}\ntokenizer: {{patch: {patch}, void_fraction: 0.1}}\n",
                          encoding="utf-8")
        base = [str(cohort["images"]), "--config", str(config), "--template", str(cohort["template"]),
                "--registered", "--skull-stripped", "--window", "1", "--labels", str(cohort["labels"]), "-o", str(out)]
        capsys.readouterr()
        code = main(["screen", *base])
        if patch == 7:
            assert code == 0
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
            assert report["tokens"]["settings"]["patch"] == 7 and report["settings"]["window"] == 1
            assert report["tokens"]["grid"] == [4, 4, 4]
            image = nib.load(str(cohort["images"] / "case06.nii.gz"))
            assert nib.load(str(out / "maps" / "case06.nii.gz")).shape == image.shape
        else:
            errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
            assert code == 2 and len(errors) == 1 and errors[0].startswith("volscan screen: error: tokenizer patch 5")
            assert not out.exists()
    # 8 slices per block of a 7-voxel cube: one line before any preprocessing (no cache written)
    fresh_cache = cohort["root"] / "cache_vit7_blocks"
    config.write_text(config.read_text(encoding="utf-8").replace("cache_vit7", "cache_vit7_blocks")
                      .replace("{patch: 5,", "{patch: 7, slices_per_block: 8,"), encoding="utf-8")
    capsys.readouterr()
    assert main(["screen", *base[:-1], str(cohort["root"] / "run_vit7_blocks")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "slices_per_block must be an integer within 1..7, got 8" in errors[0], errors
    assert not fresh_cache.exists() and not (cohort["root"] / "run_vit7_blocks").exists()


def test_existing_output_needs_force(cohort: dict, labelled_run: dict, capsys) -> None:
    out = labelled_run["out"]
    before = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert main(["screen", *cohort["base"], "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"volscan screen: error: .*already exists; use --force.*", err)
    assert (out / "report.json").read_bytes() == before


def test_evaluate_refuses_masks_on_another_grid(labelled_run: dict, tmp_path: Path, capsys) -> None:
    out = labelled_run["out"]
    before = (out / "report.json").read_bytes()
    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), np.eye(4)), str(labels / "case04.nii.gz"))
    capsys.readouterr()
    assert main(["evaluate", str(out), "--labels", str(labels), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("volscan evaluate: error: ") and len(err.splitlines()) == 1
    assert str(labels / "case04.nii.gz") in err and "does not match" in err
    assert (out / "report.json").read_bytes() == before


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_evaluate_refuses_intensity_scans_as_labels(cohort: dict, labelled_run: dict, tmp_path: Path, capsys,
                                                    dtype: type) -> None:
    """Scans given as --labels (float: non-integer values; int16: hundreds of values) are
    refused with one line naming the file, and the run's metrics stay as they were."""
    out = labelled_run["out"]
    before = {name: (out / name).read_bytes() for name in ("report.json", "report.html", "scores.csv")}
    labels = tmp_path / "scans-as-labels"
    labels.mkdir()
    for source in sorted(cohort["images"].iterdir()):
        image = nib.load(str(source))
        data = np.asarray(image.dataobj)
        if dtype is np.int16:
            data = np.round(data * 10)
        nib.save(nib.Nifti1Image(data.astype(dtype), image.affine), str(labels / source.name))
    capsys.readouterr()
    assert main(["evaluate", str(out), "--labels", str(labels), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("volscan evaluate: error: ") and len(err.splitlines()) == 1
    assert "not a label map" in err and str(labels) in err
    assert {name: (out / name).read_bytes() for name in before} == before
