"""`volscan screen` on 2D images (the degenerate case): PNG maps at each image's own size,
image/pixel metrics and AUPRO, MuSc method, and `volscan evaluate` on a 2D run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipelines.cli import main
from pipelines.images2d import read_float_map

ANOMALOUS = {"img02": (10, 12), "img05": (25, 30)}  # (row, col) of a bright square


def make_images(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Seven 40 x 50 grey 'textures' (one a 44 x 44 JPEG), two with a bright square + masks."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(7):
        sid = f"img{i:02d}"
        shape = (44, 44) if i == 6 else (40, 50)
        rows, cols = np.mgrid[: shape[0], : shape[1]]
        image = 100 + 40 * np.sin(cols / 3.0) + rng.normal(0, 8, shape)
        mask = np.zeros(shape, dtype=np.uint8)
        if sid in ANOMALOUS:
            r, c = ANOMALOUS[sid]
            image[r : r + 8, c : c + 8] = 255
            mask[r : r + 8, c : c + 8] = 255
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        if i == 6:
            Image.fromarray(pixels).save(images / f"{sid}.jpg", quality=95)
        else:
            Image.fromarray(np.repeat(pixels[..., None], 3, axis=2)).save(images / f"{sid}.png")
        if sid in ANOMALOUS or i == 0:  # img00: empty mask
            Image.fromarray(mask).save(labels / f"{sid}.png")
    return images, labels


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory, tiny_vit_spec: dict) -> dict:
    root = tmp_path_factory.mktemp("screen2d")
    images, labels = make_images(root)
    spec = dict(tiny_vit_spec)
    config = root / "config.toml"
    config.write_text(
        f'backbone = "{spec.pop("name")}"\nweights = "random"\nsize = 42\nproj_dim = 8\n'
        f'cache = "{root / "cache"}"\n[backbone_kwargs]\n'
        + "".join(f"{k} = {v}\n" for k, v in spec.items())
    )
    out = root / "run"
    argv = ["screen", str(images), "-o", str(out), "--config", str(config), "--labels", str(labels),
            "--method", "musc"]
    assert main(argv) == 0
    return {"root": root, "images": images, "labels": labels, "out": out, "argv": argv,
            "report": json.loads((out / "report.json").read_text(encoding="utf-8"))}


def test_2d_outputs(run2d: dict) -> None:
    out, report = run2d["out"], run2d["report"]
    assert report["kind"] == "2d" and report["settings"]["method"] == "musc" and report["codegraph"] is None
    assert report["token_grid"] == [3, 3]
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in rows] == list(range(1, 8))
    assert {r["id"]: int(r["label"]) for r in rows} == {f"img{i:02d}": int(f"img{i:02d}" in ANOMALOUS) for i in range(7)}
    for source in run2d["images"].iterdir():
        sid = source.name.split(".")[0]
        with Image.open(source) as image:
            width, height = image.size
        exact = read_float_map(out / "maps" / f"{sid}.tiff")
        assert exact.shape == (height, width) and np.isfinite(exact).all()
        for suffix in ("_heat.png", "_overlay.png"):
            with Image.open(out / "maps" / f"{sid}{suffix}") as picture:
                assert picture.format == "PNG" and picture.size == (width, height) and picture.mode == "RGB"
    page = (out / "report.html").read_text(encoding="utf-8")
    for relative in report["figures"].values():
        assert f"src='{relative}'" in page and (out / relative).read_bytes()[:4] == b"\x89PNG"


def test_2d_metrics(run2d: dict) -> None:
    metrics = run2d["report"]["metrics"]
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro",
                "aupro_cflow"):
        assert 0.0 <= metrics[key] <= 1.0, key
    scores = {s["id"]: s["score"] for s in run2d["report"]["subjects"]}
    ids = sorted(scores)
    expected = roc_auc_score([i in ANOMALOUS for i in ids], [scores[i] for i in ids])
    assert metrics["image_auroc"] == pytest.approx(expected)
    assert metrics["n_anomalous_images"] == len(ANOMALOUS)


def test_2d_evaluate_matches_and_rerun_hits_cache(run2d: dict) -> None:
    out2 = run2d["root"] / "run_again"
    argv = [a for a in run2d["argv"] if a != str(run2d["labels"]) and a != "--labels"]
    argv[argv.index("-o") + 1] = str(out2)
    assert main(argv) == 0
    report = json.loads((out2 / "report.json").read_text(encoding="utf-8"))
    assert report["tokens"]["computed"] == 0 and report["metrics"] is None
    assert main(["evaluate", str(out2), "--labels", str(run2d["labels"])]) == 0
    metrics = json.loads((out2 / "report.json").read_text(encoding="utf-8"))["metrics"]
    for key, value in run2d["report"]["metrics"].items():
        if isinstance(value, float):
            assert metrics[key] == pytest.approx(value), key


def make_blob_images(root: Path, seed: int = 1) -> tuple[Path, Path, dict[str, tuple[float, float]]]:
    """Ten 112^2 grey textures (a smooth random field plus noise, contrast everywhere up to the
    frame) and three more with one bright Gaussian blob (radius 8 px) away from the frame; masks
    for the blob images. Returns the folders and {blob image id: blob centre (row, col)}."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    side, ids = 112, [f"img{i:02d}" for i in range(13)]
    centres = {}
    for k, i in enumerate(rng.permutation(len(ids))):
        field = ndimage.gaussian_filter(rng.normal(0, 1, (side, side)), side / 24)
        image = 120 + 15 * field / field.std() + rng.normal(0, 6, (side, side))
        if k < 3:
            centre = rng.uniform(0.25 * side, 0.75 * side, 2)
            rows, cols = np.mgrid[:side, :side]
            d2 = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / 8.0 ** 2
            image = image + 100 * np.exp(-d2 / 2)
            Image.fromarray(np.where(d2 <= 2.0, 255, 0).astype(np.uint8)).save(labels / f"{ids[i]}.png")
            centres[ids[i]] = (float(centre[0]), float(centre[1]))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"{ids[i]}.png")
    return images, labels, centres


def test_blob_images_rank_first_and_border_tokens_are_not_hotter(tmp_path: Path) -> None:
    """Classical features, CoDeGraph: the three blob images rank 1-3 with their hotspots near their
    blobs (within 3 tokens: at the frame an r = 5 window is moved up to 2 tokens inward, so a
    frame token next to a blob averages it too), and the tokens on the image's frame score at most
    1.2x the interior ones over the healthy images (1.11x; with edge-repeating filters and MuSc's
    zero-padded LNAMD 1.31x, and frame hotspots of healthy images outranked two blob images)."""
    images, labels, centres = make_blob_images(tmp_path)
    out = tmp_path / "run"
    assert main(["screen", str(images), "--labels", str(labels), "--backbone", "classical", "--size", "112",
                 "--device", "cpu", "--cache", str(tmp_path / "cache"), "--top", "1", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["settings"]["scoring"]["lnamd_border"] == "shift"
    assert {s["id"] for s in report["subjects"] if s["rank"] <= 3} == set(centres)
    for entry in report["subjects"]:
        if entry["id"] in centres:
            assert np.hypot(*np.subtract(entry["hotspot"]["voxel"], centres[entry["id"]])) <= 3 * 14, entry
    with np.load(out / "elements.npz") as data:
        ids, scores = [str(i) for i in data["ids"]], data["element_scores"]
    healthy = scores[[i for i, sid in enumerate(ids) if sid not in centres]]  # (10, 8, 8)
    frame = np.ones(healthy.shape[1:], dtype=bool)
    frame[1:-1, 1:-1] = False
    assert healthy[:, frame].mean() <= 1.2 * healthy[:, ~frame].mean()
