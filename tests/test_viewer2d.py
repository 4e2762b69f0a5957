"""The report's 2D viewer: data files that decode back to the run's maps in score units, the
report section, and the page drawn in a real headless browser from file:// with no error.

The run screens the tiny image folder of test_screen_2d (seven images, two with a bright square
and its mask) with the weights-free classical features, MuSc, 42 px model input."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import _browse, _chromium
from test_screen_2d import ANOMALOUS, make_images

from pipelines.cli import main
from pipelines.images2d import read_float_map


@pytest.fixture(scope="module")
def run2d_classical(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("viewer2d")
    images, labels = make_images(root)
    out = root / "run"
    assert main(["screen", str(images), "--labels", str(labels), "--backbone", "classical", "--size", "42",
                 "--method", "musc", "--device", "cpu", "--cache", str(root / "cache"), "--viewer-scans", "5",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"root": root, "out": out, "report": report, "labels": labels}


def _manifest(out: Path) -> list[dict]:
    text = (out / "viewer" / "images2d.js").read_text(encoding="utf-8")
    return json.loads(text.removeprefix("window.VOLSCAN_IMAGES = ").rstrip().removesuffix(";"))


def _png(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image)


def test_viewer2d_files_hold_the_maps_in_score_units(run2d_classical: dict) -> None:
    out, report = run2d_classical["out"], run2d_classical["report"]
    shown = [s for s in report["subjects"] if s["rank"] <= 5 or s["flagged"]]
    assert report["viewer"] == [s["id"] for s in shown]
    manifest = _manifest(out)
    assert [m["id"] for m in manifest] == report["viewer"]
    assert [m["rank"] for m in manifest] == [s["rank"] for s in shown]
    for entry, item in zip(shown, manifest):
        low, high = item["low"], item["high"]
        assert low <= item["threshold"] <= high and item["score"] == pytest.approx(entry["score"])
        text = (out / item["file"]).read_text(encoding="utf-8")
        data = json.loads(re.fullmatch(r"volscanViewer2d\.register\(\d+, (.*)\);\n", text, re.S).group(1))
        exact = read_float_map(out / "maps" / f"{entry['id']}.tiff")
        codes = _png(data["map"])
        assert codes.shape == exact.shape == (data["height"], data["width"]) and codes.dtype == np.uint8
        # score = low + code (high - low) / 255, within half a quantisation step of the exact map
        decoded = low + codes.astype(np.float64) * (high - low) / 255
        assert np.abs(decoded - exact).max() <= 0.5 * (high - low) / 255 + 1e-6
        assert _png(data["image"]).shape == (*exact.shape, 3)
        has_mask = (run2d_classical["labels"] / f"{entry['id']}.png").exists()
        assert (data["mask"] is not None) == has_mask
        if entry["id"] in ANOMALOUS:
            r, c = ANOMALOUS[entry["id"]]
            assert _png(data["mask"])[r : r + 8, c : c + 8].all() and _png(data["mask"]).sum() == 64 * 255
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Viewer</h2>" in page and 'id="v2-threshold"' in page and "viewer/viewer2d.js" in page
    assert "niivue" not in page.lower()  # the 2D viewer needs no WebGL library


class _Link(str):
    """A file:// URI with a fragment, for `_browse` (which opens `page.as_uri()`)."""

    def as_uri(self) -> str:
        return str(self)


def _status(result) -> tuple[dict, str]:
    status = re.search(r'<p id="v2-status"([^>]*)>([^<]*)</p>', result.stdout)
    assert status, result.stderr[-2000:]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', status.group(1))), status.group(2)


def test_viewer2d_draws_offline_in_a_headless_browser(run2d_classical: dict, tmp_path: Path) -> None:
    if _chromium() is None:
        import os

        if os.environ.get("CI"):  # .ci/run installs Debian's chromium: missing there is a failure
            pytest.fail("no Chromium in CI")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    copy = tmp_path / "moved run"  # relative links only: the folder works wherever it is
    shutil.copytree(run2d_classical["out"], copy)
    page = copy / "report.html"
    result = _browse(page, "--dump-dom")
    attributes, text = _status(result)
    assert attributes.get("state") == "drawn", (text, result.stderr[-2000:])
    assert json.loads(attributes["errors"].replace("&quot;", '"')) == []
    assert int(attributes["colours"]) > 20  # image under map, not a blank canvas
    top = run2d_classical["report"]["subjects"][0]["id"]
    assert text.startswith(f"{top}: rank 1")
    assert "Uncaught" not in result.stderr
    # The slider is in score units: at the run's lowest score every pixel is above it, at the
    # highest only the map's peak; a link picks the image.
    item = _manifest(copy)[-1]
    data = json.loads(re.search(r"register\(\d+, (.*)\);", (copy / item["file"]).read_text()).group(1))
    pixels = data["width"] * data["height"]
    low_run = _browse(_Link(f"{page.as_uri()}#image={item['id']}&threshold={item['low']}"), "--dump-dom")
    attributes, text = _status(low_run)
    assert attributes["state"] == "drawn" and text.startswith(f"{item['id']}: rank {item['rank']}")
    assert int(attributes["above"]) == pixels
    high_run = _browse(_Link(f"{page.as_uri()}#image={item['id']}&threshold={item['high']}"), "--dump-dom")
    attributes, _ = _status(high_run)
    assert 0 <= int(attributes["above"]) < pixels // 4
    assert json.loads(attributes["errors"].replace("&quot;", '"')) == []
    shot = tmp_path / "report.png"
    _browse(page, f"--screenshot={shot}")
    assert shot.read_bytes()[:4] == b"\x89PNG"
