"""The screen report: hotspots (native voxels and RAS mm), flags, report.json/HTML contents,
and the offline viewer in a real headless browser.

The end-to-end run screens the tiny cohort of test_screen (ellipsoid brains, three with a
bright sphere lesion, inputs stored flipped / on a shifted grid) with the weights-free
classical features, which see a bright sphere; cube 56 = a 4^3 token grid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_screen import LESIONS, make_cohort, make_template

from pipelines.cli import main
from pipelines.flagging import MAD_TO_SIGMA, flag_rule, rank_percentile
from pipelines.hotspots import find_hotspot
from volumetric.errors import VolscanError

CUBE = 56


# ---------------------------------------------------------------- hotspot geometry (no model)


def test_hotspot_voxel_and_ras_mm_on_a_flipped_anisotropic_grid() -> None:
    """A map stored LPS-like (x and y flipped) with 2 x 3 x 1.5 mm voxels: the hotspot voxel is
    the argmax in file order and its millimetres are affine @ voxel, with the sign of RAS."""
    affine = np.array([[-2.0, 0, 0, 40.0], [0, -3.0, 0, 60.0], [0, 0, 1.5, -20.0], [0, 0, 0, 1]])
    score_map = np.zeros((30, 25, 40), dtype=np.float32)
    score_map[5, 20, 33] = 1.0
    score_map[4:7, 19:22, 32:35] += 0.5  # 27-voxel plateau above 0.4 around the peak
    score_map[20, 3, 5] = 0.45  # a separate, smaller bump: not part of the hotspot's region
    spot = find_hotspot(score_map, threshold=0.4, affine=affine)
    assert spot.voxel == (5, 20, 33) and spot.value == pytest.approx(1.5)
    # x = -2*5 + 40 = 30 (patient's right), y = -3*20 + 60 = 0, z = 1.5*33 - 20 = 29.5
    assert spot.world_mm == pytest.approx((30.0, 0.0, 29.5))
    assert spot.region_voxels == 27 and spot.region_mm3 == pytest.approx(27 * 2 * 3 * 1.5)
    below = find_hotspot(score_map, threshold=2.0, affine=affine)
    assert below.region_voxels == 0 and below.region_mm3 == 0.0
    flat = find_hotspot(np.zeros((5, 7)), threshold=0.1)  # every voxel tied: the centre
    assert flat.world_mm is None and flat.region_mm3 is None and flat.voxel == (2, 3)


def test_hotspot_stays_in_its_region_and_centres_a_plateau() -> None:
    """An edge token's interpolated plateau reaches past the brain: the hotspot is the plateau's
    voxel nearest its centre among brain voxels, never the outermost voxel a plain argmax picks."""
    score_map = np.zeros((12, 10, 8), dtype=np.float32)
    score_map[0:5, 2:7, 1:6] = 0.8  # the plateau, partly outside the brain (rows 0-1)
    score_map[6, 5, 4] = 0.5
    brain = np.zeros(score_map.shape, dtype=bool)
    brain[2:11, 1:9, 1:7] = True
    plain = find_hotspot(score_map, threshold=0.4)
    assert plain.voxel == (2, 4, 3)  # the plateau's centre among all its voxels (rows 0-4)
    inside = find_hotspot(score_map, threshold=0.4, region=brain)
    assert inside.voxel == (3, 4, 3) and inside.value == pytest.approx(0.8)  # centre of rows 2-4
    outside_only = score_map.copy()
    outside_only[0, 0, 0] = 5.0  # the map's maximum, outside the brain: never the hotspot
    assert find_hotspot(outside_only, threshold=0.4, region=brain).voxel == inside.voxel
    with pytest.raises(VolscanError, match="region shape"):
        find_hotspot(score_map, threshold=0.4, region=brain[:-1])


def test_native_brain_map_is_zero_outside_the_mask() -> None:
    """The native map equals the plain resampled map inside the brain mask and 0 outside."""
    from pipelines.maps import native_brain_map
    from preprocessing.native_mapping import NativeMapping

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mapping = NativeMapping((10, 10, 10), affine, 10, affine, np.eye(4))
    rng = np.random.default_rng(0)
    cube_map = rng.uniform(0.1, 1.0, (10, 10, 10)).astype(np.float32)
    cube_mask = np.zeros((10, 10, 10), dtype=bool)
    cube_mask[2:8, 3:9, 1:6] = True
    native, brain = native_brain_map(cube_map, mapping, cube_mask)
    assert np.array_equal(brain, cube_mask)  # identical grids: the mask comes back unchanged
    np.testing.assert_allclose(native[brain], cube_map[cube_mask], rtol=1e-5)
    assert not native[~brain].any()
    unmasked, none = native_brain_map(cube_map, mapping, None)
    assert none is None and np.allclose(unmasked, cube_map, rtol=1e-5)


def test_flag_rule_is_the_robust_z_rule_and_says_so() -> None:
    scores = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 3.0])
    median = np.median(scores)
    mad = np.median(np.abs(scores - median))
    rule = flag_rule(scores, 3.0)
    assert rule.threshold == pytest.approx(median + 3 * MAD_TO_SIGMA * mad)
    assert (scores > rule.threshold).tolist() == [False] * 5 + [True]
    assert rule.describe() == (f"anomaly score above {rule.threshold:.4g} = cohort median {median:.4g} + 3 x "
                               f"{MAD_TO_SIGMA * mad:.4g} (robust standard deviation: 1.4826 x MAD); --flag-z 3")
    # Over half the scores equal: the MAD is 0 and the rule falls back to the standard deviation, and says so.
    tied = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    fallback = flag_rule(tied, 2.0)
    assert fallback.threshold == pytest.approx(1.0 + 2 * tied.std()) and not fallback.robust
    assert "standard deviation (the MAD is 0)" in fallback.describe() and "robust" not in fallback.describe()
    assert flag_rule(np.ones(5), 3.0).threshold == float("inf")
    assert "same anomaly score" in flag_rule(np.ones(5), 3.0).describe()
    assert [rank_percentile(r, 5) for r in (1, 3, 5)] == [100.0, 50.0, 0.0]


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def classical_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("report")
    images, labels, truth = make_cohort(root)
    template = make_template(root / "template")
    out = root / "run"
    code = main(["screen", str(images), "--labels", str(labels), "--template", str(template), "--registered",
                 "--skull-stripped", "--backbone", "classical", "--size", str(CUBE), "--device", "cpu",
                 "--cache", str(root / "cache"), "--top", "3", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"root": root, "images": images, "labels": labels, "truth": truth, "out": out, "report": report}


def test_report_json_hotspots_match_each_input_grid(classical_run: dict) -> None:
    report = classical_run["report"]
    assert [s["rank"] for s in report["subjects"]] == list(range(1, len(classical_run["truth"]) + 1))
    for entry in report["subjects"]:
        image = nib.load(entry["image"])
        assert Path(entry["image"]).is_absolute()
        spot = entry["hotspot"]
        voxel = np.array(spot["voxel"])
        assert np.all(voxel >= 0) and np.all(voxel < image.shape)
        expected = image.affine[:3, :3] @ voxel + image.affine[:3, 3]
        assert spot["world_mm_ras"] == pytest.approx(expected.tolist(), abs=0.01)
        stored = np.asarray(nib.load(str(classical_run["out"] / entry["map"])).dataobj)
        assert stored[tuple(voxel)] == pytest.approx(stored.max())
        # Skull-stripped input: the hotspot is on brain (non-zero) and the map is 0 off the brain.
        scan = np.asarray(image.dataobj)
        assert scan[tuple(voxel)] != 0 and not stored[scan == 0].any()
        assert spot["region_voxels"] >= 0 and 0.0 <= entry["percentile"] <= 100.0
        assert entry["flagged"] == (entry["score"] > report["summary"]["flag_threshold"])


def test_top_ranked_lesion_scan_hotspot_lies_in_or_next_to_its_lesion(classical_run: dict) -> None:
    """Within one token cube (14 cube voxels, in mm along the cube's coarsest axis) of the lesion."""
    out, report = classical_run["out"], classical_run["report"]
    top = next(s for s in report["subjects"] if classical_run["truth"][s["id"]])
    assert top["rank"] <= 2  # the bright sphere is seen
    label = nib.load(str(classical_run["labels"] / f"{top['id']}.nii.gz"))
    lesion = np.argwhere(np.asarray(label.dataobj) > 0)
    lesion_mm = lesion @ label.affine[:3, :3].T + label.affine[:3, 3]
    distance = np.linalg.norm(lesion_mm - np.array(top["hotspot"]["world_mm_ras"]), axis=1).min()
    cube_affine = np.array(json.loads((out / "mappings" / f"{top['id']}.json").read_text())["cube_affine"])
    one_cube_mm = 14 * np.sqrt((cube_affine[:3, :3] ** 2).sum(axis=0)).max()
    assert distance <= one_cube_mm, (top["id"], distance, one_cube_mm, LESIONS[top["id"]])


@pytest.mark.parametrize("method", ["codegraph", "musc"])
def test_phantom_lesion_scan_hotspot_lies_in_or_next_to_its_lesion(tmp_path: Path, method: str) -> None:
    """pipelines.phantom cohort (procedural head, random lesions 14-18 mm, subjects on their own
    grids in RAS/LPS/ASL/... voxel orders and anisotropic voxels, no warp so `--registered`
    holds), classical features, either method: the top-ranked lesion scan's hotspot is within one
    token cube of its lesion."""
    from pipelines.phantom import LesionSettings, PhantomConfig, generate_cohort
    from pipelines.phantom.warps import WarpSettings

    config = PhantomConfig(n_normal=8, n_lesion=3, n_consistent=0, seed=0, size=48, template="procedural",
                           n_sites=1, bias_strength=0.0, lesions=LesionSettings(radius_mm=(14.0, 18.0), contrast=1.5),
                           warps=WarpSettings(rotation_deg=0.0, scale_range=(1.0, 1.0), shift_mm=0.0, elastic_mm=0.0))
    cohort = generate_cohort(tmp_path / "cohort", config, progress=False)
    out = tmp_path / "run"
    assert main(["screen", str(cohort.images_dir), "--labels", str(cohort.labels_dir), "--template",
                 str(cohort.template_dir), "--registered", "--brain-mask", "template", "--backbone", "classical",
                 "--method", method, "--size", str(CUBE), "--device", "cpu", "--cache", str(tmp_path / "cache"),
                 "--top", "1", "--viewer-scans", "0", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert not (out / "viewer").exists() and report["viewer"] == []
    top = next(s for s in report["subjects"] if cohort.groups[s["id"]] == "lesion")
    assert top["rank"] == 1
    label = nib.load(str(cohort.label(top["id"])))
    lesion = np.argwhere(np.asarray(label.dataobj) > 0)
    lesion_mm = lesion @ label.affine[:3, :3].T + label.affine[:3, 3]
    distance = np.linalg.norm(lesion_mm - np.array(top["hotspot"]["world_mm_ras"]), axis=1).min()
    cube_affine = np.array(json.loads((out / "mappings" / f"{top['id']}.json").read_text())["cube_affine"])
    one_cube_mm = 14 * np.sqrt((cube_affine[:3, :3] ** 2).sum(axis=0)).max()
    assert distance <= one_cube_mm, (top["id"], distance, one_cube_mm)
    # Raw heads (scalp and skull on): every scan's hotspot lies in its brain mask, the map is 0 outside it.
    assert_hotspots_in_brain_masks(out, report)


def assert_hotspots_in_brain_masks(out: Path, report: dict) -> None:
    """Each scan's hotspot is a voxel of the run's brain mask brought to the input grid (the cube
    mask of `elements.npz` through the scan's own `NativeMapping`), and its map is 0 off that mask."""
    from pipelines.evaluate import RunElements
    from preprocessing.native_mapping import NativeMapping

    elements = RunElements.load(out / "elements.npz")
    for entry in report["subjects"]:
        mapping = NativeMapping.load(out / "mappings" / f"{entry['id']}.json")
        cube_mask = elements.brain_mask(elements.ids.index(entry["id"]))
        brain = mapping.to_native(cube_mask.astype(np.float32), order=0) > 0.5
        stored = np.asarray(nib.load(str(out / entry["map"])).dataobj)
        assert brain[tuple(entry["hotspot"]["voxel"])], entry["id"]
        assert not stored[~brain].any(), entry["id"]


def test_report_settings_are_the_ones_used(classical_run: dict) -> None:
    report = classical_run["report"]
    settings = report["settings"]
    assert settings["device"] == "cpu" and settings["size"] == CUBE
    assert Path(settings["cache"]).is_absolute() and Path(settings["template"]).is_absolute()
    assert settings["preprocess"]["margin_mm"] == 4.0 and settings["preprocess"]["cubic"] is False
    assert settings["brain_mask"] == settings["preprocess"]["brain_mask"] and settings["brain_mask"] is not None
    assert settings["scoring"]["lnamd_radii"] == [1, 3, 5]  # the resolved ScoringConfig, not the empty table
    assert Path(report["input"]).is_absolute() and Path(report["output"]) == classical_run["out"].resolve()
    summary = report["summary"]
    assert summary["method"] == "codegraph" and summary["features"]["grid"] == [4, 4, 4]
    assert summary["flagged"] == [s["id"] for s in report["subjects"] if s["flagged"]]
    assert {s["brain_mask"] for s in report["subjects"]} == {"nonzero"}  # --skull-stripped: auto -> nonzero
    assert settings["brain_mask_used"] == {"nonzero": sorted(classical_run["truth"])}
    assert report["viewer"] == [s["id"] for s in report["subjects"]]  # default 20 >= 8 scans: all, rank order


def test_report_html_reads_top_down(classical_run: dict) -> None:
    out, report = classical_run["out"], classical_run["report"]
    page = (out / "report.html").read_text(encoding="utf-8")
    order = [page.index(marker) for marker in
             ("class='summary'", "<h2>Metrics</h2>", "<h2>Ranking</h2>", "<h2>Viewer</h2>",
              "<h2>Top-ranked scans</h2>", "<h2>CoDeGraph communities</h2>", "<h2>Settings as used</h2>",
              "<h2>Glossary</h2>")]
    assert order == sorted(order)
    assert f"{len(report['summary']['flagged'])} of {len(classical_run['truth'])}" in page
    summary = report["summary"]  # what was flagged, and by which rule with its numbers
    assert "Flagged as outliers of this cohort" in page and f"rule: {summary['flag_rule']}" in page
    assert f"above {summary['flag_threshold']:.4g} = cohort median" in summary["flag_rule"]
    top = report["subjects"][0]
    assert ", ".join(f"{v:.1f}" for v in top["hotspot"]["world_mm_ras"]) in page
    assert "Dice protocol" in page and "token-grid F1-max" in page and "grid_f1_max" not in page
    panels = [s["panel"] for s in report["subjects"] if s.get("panel")]
    assert len(panels) == 3 and all((out / p).read_bytes()[:4] == b"\x89PNG" for p in panels)
    graph = report["codegraph"]
    # Each community's density against its fence, and the verdict with its reason.
    rows = re.findall(r'<tr><td>\d+</td><td>\d+</td><td class="num">[^<]*</td><td(?: class="num")?>[^<]*</td>'
                      r"<td>((?:yes|no)[^<]*)</td><td>([^<]*)</td></tr>", page)
    assert len(rows) == len(graph["communities"]) >= 1
    assert sorted(i for _, row in rows for i in row.split(", ")) == sorted(classical_run["truth"])
    outliers = {", ".join(c) for c in graph["outlier_communities"]}
    for verdict, members in rows:
        assert verdict.startswith("yes: density") == (members in outliers)
        assert verdict.startswith("no") == (members not in outliers) and ("fence" in verdict or "single" in verdict)
    # The summary box carries the headline metrics and says why ranked scans may stay unflagged.
    box = page.split("class='summary'")[1].split("</div>")[0]
    assert f"patient AUROC {report['metrics']['patient_auroc']:.3f}" in box and "can stay unflagged" in box
    settings_table = page.split("<h2>Settings as used</h2>")[1].split("<h2>")[0]
    assert "<td>layers</td><td>(not used)</td>" in settings_table  # classical features have no layers
    assert "<td>null</td>" not in settings_table


# ---------------------------------------------------------------- the viewer in a real browser


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)


def _browse(page: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` (file://, no server, no network), software WebGL."""
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu-sandbox", "--use-angle=swiftshader",
               "--enable-unsafe-swiftshader", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
               "--virtual-time-budget=30000", "--window-size=1280,2400", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_viewer_draws_offline_in_a_headless_browser(classical_run: dict, tmp_path: Path) -> None:
    if _chromium() is None:
        if os.environ.get("CI"):  # .ci/run installs Debian's chromium: missing there is a failure
            pytest.fail("no Chromium in CI")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    out = classical_run["out"]
    copy = tmp_path / "moved run"  # the folder works wherever it is (relative links only)
    shutil.copytree(out, copy)
    result = _browse(copy / "report.html", "--dump-dom")
    status = re.search(r'<p id="vs-status"([^>]*)>([^<]*)</p>', result.stdout)
    assert status, result.stderr[-2000:]
    attributes = dict(re.findall(r'data-(\w+)="([^"]*)"', status.group(1)))
    assert attributes.get("state") == "drawn", (status.group(0), result.stderr[-2000:])
    assert json.loads(attributes["errors"].replace("&quot;", '"')) == []
    assert int(attributes["colours"]) > 20  # a drawn scan, not a blank canvas
    top = classical_run["report"]["subjects"][0]["id"]
    assert top in status.group(2)
    assert "Uncaught" not in result.stderr
    shot = tmp_path / "report.png"
    _browse(copy / "report.html", f"--screenshot={shot}")
    assert shot.read_bytes()[:4] == b"\x89PNG"


def test_community_table_says_a_diffuse_community_was_set_aside() -> None:
    """A healthy subgroup shifted on every element is dense far above the fence and set aside as
    diffuse (CoDeGraph's default): the table says so, not "density <= fence"."""
    from pipelines.report_html import _communities
    from volumetric.engine.codegraph import CoDeGraph
    from volumetric.engine.synthetic import synthetic_batch, with_subgroup

    features, subgroup = with_subgroup(synthetic_batch(n=30, m=64, consistent=5, seed=0), 7, 0)
    result = CoDeGraph()(features)
    assert result.diffuse_communities
    graph = {"communities": [[f"s{i}" for i in c] for c in result.communities],
             "outlier_communities": [[f"s{i}" for i in result.communities[c]] for c in result.outlier_communities],
             "excluded_fraction": result.excluded_fraction, "details": json.loads(json.dumps(result.summary()))}
    html = "".join(_communities(graph))
    rows = re.findall(r"<tr>(.*?)</tr>", html, flags=re.S)
    for c in result.diffuse_communities:
        [row] = [r for r in rows if ", ".join(f"s{i}" for i in result.communities[c]) in r]
        assert "set aside as diffuse" in row and "&lt;=" not in row
    assert "set aside as diffuse" in html.split("<table")[0]  # the paragraph explains it
