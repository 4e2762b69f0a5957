"""Phantom cohorts: determinism by seed, label/image grids, geometry through affines, lesions, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main
from pipelines.run_folder import RUN_MARKER
from pipelines.phantom import (
    CONTRASTS,
    Cohort,
    LesionSettings,
    PhantomConfig,
    WarpSettings,
    generate_cohort,
    lookalike_config,
)
from pipelines.phantom.anatomy import procedural_head
from pipelines.phantom.lesions import LABEL_CORE, LABEL_EDEMA, LABEL_RIM, render_lesion, sample_lesion
from preprocessing.template import load_template
from volumetric.errors import VolscanError

SMALL = PhantomConfig(n_normal=2, n_lesion=2, n_consistent=2, seed=5, size=40, template="procedural",
                      lesions=LesionSettings(radius_mm=(14.0, 18.0)))
NO_WARP = WarpSettings(rotation_deg=0.0, scale_range=(1.0, 1.0), shift_mm=0.0, elastic_mm=0.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    return generate_cohort(tmp_path_factory.mktemp("ph") / "a", SMALL, progress=False)


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {f"{p.parent.name}/{p.name}": np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_same_bytes_and_different_seed_differs(cohort, tmp_path):
    again = generate_cohort(tmp_path / "b", SMALL, progress=False)
    files = sorted(p.relative_to(cohort.root) for p in cohort.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in (f for f in files if f.name != RUN_MARKER):  # the run marker records its creation time
        assert (cohort.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    other = generate_cohort(tmp_path / "c", replace(SMALL, seed=6), progress=False)
    ours, theirs = _arrays(cohort.images_dir), _arrays(other.images_dir)
    differing = [k for k in ours if ours[k].shape != theirs[k].shape or not np.array_equal(ours[k], theirs[k])]
    assert len(differing) == len(ours)
    # The template is the anatomy, shared across seeds (one atlas for all cohorts).
    ours, theirs = _arrays(cohort.template_dir), _arrays(other.template_dir)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_layout_groups_and_label_grids(cohort):
    info = json.loads((cohort.root / "cohort.json").read_text(encoding="utf-8"))
    assert info["seed"] == 5 and info["anatomy"] == "procedural"
    assert {g: len(v) for g, v in info["groups"].items()} == {"normal": 2, "lesion": 2, "consistent": 2,
                                                                    "lookalike": 0}
    orientations, spacings = set(), set()
    for subject in cohort.subjects:
        image, label = nib.load(cohort.image(subject)), nib.load(cohort.label(subject))
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine, atol=1e-6)
        np.testing.assert_allclose(image.affine, info["subjects"][subject]["affine"], atol=1e-4)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        values = np.unique(np.asarray(label.dataobj))
        assert set(values) <= {0, LABEL_CORE, LABEL_EDEMA, LABEL_RIM}
        lesion_voxels = int((np.asarray(label.dataobj) > 0).sum())
        assert lesion_voxels == info["subjects"][subject]["lesion_voxels"]
        assert (lesion_voxels > 0) == (cohort.groups[subject] != "normal")
        orientations.add(nib.aff2axcodes(image.affine))
        spacings.add(tuple(np.round(image.header.get_zooms()[:3], 3)))
        assert np.asarray(image.dataobj).max() > 100  # scanner-scale intensities, not [0, 1]
    assert len(orientations) > 1 and len(spacings) == len(cohort.subjects)
    template = load_template(cohort.template_dir)  # the layout `resolve_template` accepts
    assert template.brain_mask.any() and template.image.array.shape == (40, 40, 40)


def test_subjects_land_on_the_template_through_their_affines(tmp_path):
    """Without warps, every subject (any voxel order and size) samples the template in world space."""
    config = replace(SMALL, n_normal=3, n_lesion=0, n_consistent=3, noise=0.0, bias_strength=0.0, warps=NO_WARP)
    cohort = generate_cohort(tmp_path / "flat", config, progress=False)
    template = nib.load(cohort.template_dir / "template.nii.gz")
    centre = np.asarray(cohort.info["consistent_lesion"]["centre_mm"])
    for subject in cohort.subjects:
        image = nib.load(cohort.image(subject))
        data = np.asarray(image.dataobj, dtype=np.float64)
        # Reference: sample the subject at the template's voxel centres, by world coordinates.
        idx = np.indices(template.shape).reshape(3, -1)
        world = template.affine[:3, :3] @ idx + template.affine[:3, 3:4]
        inv = np.linalg.inv(image.affine)
        vox = np.rint(inv[:3, :3] @ world + inv[:3, 3:4]).astype(int)
        inside = np.all((vox >= 0) & (vox < np.asarray(data.shape)[:, None]), axis=0)
        ours = data[tuple(vox[:, inside])]
        theirs = np.asarray(template.dataobj, dtype=np.float64).reshape(-1)[inside]
        assert np.corrcoef(ours, theirs)[0, 1] > 0.9, subject
        labels = np.asarray(nib.load(cohort.label(subject)).dataobj)
        if cohort.groups[subject] == "consistent":
            lesion_world = image.affine[:3, :3] @ np.argwhere(labels > 0).mean(axis=0) + image.affine[:3, 3]
            assert np.linalg.norm(lesion_world - centre) < 2 * max(image.header.get_zooms()[:3])


def test_consistent_group_shares_one_lesion_and_random_ones_differ(cohort):
    lesions = {s: m["lesions"] for s, m in cohort.info["subjects"].items()}
    shared = [lesions[s][0] for s in cohort.members("consistent")]
    assert all(lesion == cohort.info["consistent_lesion"] for lesion in shared)
    own = [lesions[s][0]["centre_mm"] for s in cohort.members("lesion")]
    assert own[0] != own[1] and cohort.info["consistent_lesion"]["centre_mm"] not in own
    assert all(not lesions[s] for s in cohort.members("normal"))


def test_render_lesion_matches_a_pointwise_reference():
    anatomy = procedural_head(40)
    rng = np.random.default_rng(0)
    lesion = sample_lesion(rng, anatomy, LesionSettings(radius_mm=(10.0, 10.0)))
    points = np.asarray(lesion.centre_mm)[:, None] + rng.uniform(-16, 16, (3, 400))
    labels, alpha, level = render_lesion(lesion, points)
    rotation, axes = np.asarray(lesion.rotation), np.asarray(lesion.axes)
    for k in range(points.shape[1]):
        local = rotation.T @ (points[:, k] - lesion.centre_mm) / (lesion.radius_mm * axes)
        r = np.linalg.norm(local)
        u = local / r
        wobble = 1 + sum(a * np.cos(np.pi * np.dot(v, u) + p) for v, a, p in
                         zip(lesion.harmonic_vectors, lesion.harmonic_amplitudes, lesion.harmonic_phases))
        depth = r / wobble
        expected = (LABEL_CORE if depth < lesion.core_fraction else LABEL_RIM if depth < lesion.rim_fraction
                    else LABEL_EDEMA if depth < 1 else 0)
        assert labels[k] == expected
        if expected:
            assert alpha[k] > 0 and level[k] > 0.2
    assert {LABEL_CORE, LABEL_RIM, LABEL_EDEMA, 0} <= set(labels.tolist())


def test_cli_refuses_to_overwrite_and_validates(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["phantom", "-o", str(out), "--normal", "2", "--lesion", "1", "--consistent", "0", "--size", "32",
            "--template", "procedural"]
    assert main(args) == 0
    assert "volscan screen" in capsys.readouterr().out
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me", encoding="utf-8")
    assert main(["phantom", "-o", str(stranger), "--force", "--size", "32", "--template", "procedural"]) == 2
    assert (stranger / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert main(["phantom", "-o", str(tmp_path / "x"), "--consistent", "1"]) == 2
    assert "consistent" in capsys.readouterr().err
    # The output folder is an option now (as for every command); the old positional form says so.
    assert main(["phantom", str(tmp_path / "y"), "--size", "32"]) == 2
    assert f"-o {tmp_path / 'y'}" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["phantom", "--size", "32"]) == 2
    assert "-o OUT" in capsys.readouterr().err
    assert main(["phantom", "-o", str(tmp_path / "z"), "--contrast", "loud"]) == 2
    assert "subtle" in capsys.readouterr().err and not (tmp_path / "z").exists()
    with pytest.raises(VolscanError):
        PhantomConfig(size=8).validate()


def test_atlas_anatomy_from_sri24(sri24_dir, tmp_path):
    cohort = generate_cohort(tmp_path / "atlas", replace(SMALL, n_lesion=1, n_consistent=0, template=str(sri24_dir)),
                             progress=False)
    assert cohort.info["anatomy"].startswith("atlas:")
    template = nib.load(cohort.template_dir / "template.nii.gz")
    mask = np.asarray(nib.load(cohort.template_dir / "brain_mask.nii.gz").dataobj) > 0
    data = np.asarray(template.dataobj)
    assert 0.05 < mask.mean() < 0.4 and np.all(data[~mask] == 0)
    subject = cohort.members("lesion")[0]
    assert np.asarray(nib.load(cohort.label(subject)).dataobj).any()
    # Skull-stripped anatomy -> skull-stripped subjects: exact zeros around the brain, as in BraTS.
    image = np.asarray(nib.load(cohort.image(subject)).dataobj)
    assert 0.05 < (image > 0).mean() < 0.5


def test_auto_anatomy_uses_sri24_only_when_resolvable(sri24_dir, tmp_path, monkeypatch):
    from pipelines.phantom.cohort import build_anatomy
    from preprocessing import template

    monkeypatch.delenv("VOLSCAN_TEMPLATE", raising=False)
    monkeypatch.setenv("VOLSCAN_CACHE_DIR", str(tmp_path / "empty-cache"))
    anatomy = build_anatomy(PhantomConfig(size=32, template="auto"))  # the SRI-24 installed with volscan
    assert anatomy.source == f"atlas:{sri24_dir}" and anatomy.skull_stripped
    monkeypatch.setattr(template, "BUNDLED_SRI24_DIR", tmp_path / "not-installed")
    assert build_anatomy(PhantomConfig(size=32, template="auto")).source == "procedural"


def test_lookalike_regime_shares_one_appearance_at_random_places(tmp_path, capsys):
    """A third of the cohort carries 1-3 lesions each, all with one appearance, each at its own place."""
    config = replace(lookalike_config(9, radius_mm=(12.0, 16.0), seed=3, size=40), n_consistent=2)
    cohort = generate_cohort(tmp_path / "look", config, progress=False)
    assert {g: len(cohort.members(g)) for g in ("normal", "lookalike", "consistent")} == {
        "normal": 6, "lookalike": 3, "consistent": 2}
    look = cohort.info["lookalike_appearance"]
    centres, counts = [], []
    for subject in cohort.members("lookalike"):
        meta = cohort.info["subjects"][subject]
        counts.append(len(meta["lesions"]))
        assert 1 <= counts[-1] <= 3 and meta["lesion_voxels"] > 0
        for lesion in meta["lesions"]:
            assert lesion["levels"] == look["levels"] and lesion["core_fraction"] == look["core_fraction"]
            assert lesion["rim_fraction"] == look["rim_fraction"] and 12.0 <= lesion["radius_mm"] <= 16.0
            centres.append(tuple(lesion["centre_mm"]))
    assert len(set(centres)) == len(centres) == sum(counts)
    assert tuple(cohort.info["consistent_lesion"]["centre_mm"]) not in centres
    assert main(["phantom", "-o", str(tmp_path / "cli"), "--normal", "2", "--lesion", "0", "--consistent", "0",
                 "--lookalike", "2", "--size", "32", "--template", "procedural", "--contrast", "bright"]) == 0
    assert "2 lookalike" in capsys.readouterr().out
    levels = Cohort.load(tmp_path / "cli").info["lookalike_appearance"]["levels"]
    assert levels["core"] > 1.4  # 'bright' = 1.5 x the T2-like core (0.95-1.1; CSF = 1)


@pytest.mark.parametrize("name", ["subtle", "bright"])
def test_contrast_scales_the_rendered_lesion(tmp_path, name):
    """Same seed, other contrast: the lesion levels scale by the multiplier, and so do the rendered
    lesion voxels (no noise/bias/warp, so image / site scale is the tissue level itself)."""
    flat = dict(noise=0.0, bias_strength=0.0, warps=NO_WARP, n_normal=0, n_consistent=0, n_lookalike=0, n_lesion=1,
                size=64)
    base = generate_cohort(tmp_path / "t2", replace(SMALL, **flat), progress=False)
    other = generate_cohort(tmp_path / name, replace(SMALL, **flat, lesions=replace(SMALL.lesions,
                                                                                    contrast=CONTRASTS[name])),
                            progress=False)
    (subject,) = base.subjects
    ours, theirs = base.info["subjects"][subject], other.info["subjects"][subject]
    for key, level in ours["lesions"][0]["levels"].items():
        assert theirs["lesions"][0]["levels"][key] == pytest.approx(level * CONTRASTS[name], abs=1e-4)
    core = np.asarray(nib.load(base.label(subject)).dataobj) == LABEL_CORE
    assert core.sum() > 5
    means = [np.asarray(nib.load(c.image(subject)).dataobj)[core].mean() / c.info["subjects"][subject]["intensity_scale"]
             for c in (base, other)]
    assert means[1] / means[0] == pytest.approx(CONTRASTS[name], rel=0.05)
    if name == "bright":
        assert means[1] > 1.3  # clearly brighter than CSF (1.0)
    with pytest.raises(VolscanError, match="contrast"):
        PhantomConfig(lesions=LesionSettings(contrast=0.0)).validate()


def test_dark_polarity_mirrors_the_levels_around_white_matter(tmp_path):
    """Same seed, `polarity="dark"`: every level v becomes WM^2 / v (WM = 0.36), darker than white
    matter, and the rendered core is as much darker than white matter as the bright one is brighter."""
    flat = dict(noise=0.0, bias_strength=0.0, warps=NO_WARP, n_normal=0, n_consistent=0, n_lookalike=0, n_lesion=1,
                size=64)
    bright = generate_cohort(tmp_path / "bright", replace(SMALL, **flat), progress=False)
    dark = generate_cohort(tmp_path / "dark", replace(SMALL, **flat, lesions=replace(SMALL.lesions, polarity="dark")),
                           progress=False)
    (subject,) = bright.subjects
    ours, theirs = bright.info["subjects"][subject], dark.info["subjects"][subject]
    for key, level in ours["lesions"][0]["levels"].items():
        assert theirs["lesions"][0]["levels"][key] == pytest.approx(0.36 ** 2 / level, abs=1e-3)
    assert theirs["lesions"][0]["levels"]["core"] < 0.2 and ours["lesions"][0]["levels"]["core"] > 0.9
    core = np.asarray(nib.load(bright.label(subject)).dataobj) == LABEL_CORE
    means = [np.asarray(nib.load(c.image(subject)).dataobj)[core].mean() / c.info["subjects"][subject]["intensity_scale"]
             for c in (bright, dark)]
    assert means[0] / 0.36 == pytest.approx(0.36 / means[1], rel=0.05)
    with pytest.raises(VolscanError, match="polarity"):
        PhantomConfig(lesions=LesionSettings(polarity="grey")).validate()


def test_artefact_scans_are_healthy_subjects_with_a_whole_scan_artefact(tmp_path):
    """`artefact_scans`: that many `normal` subjects get the listed artefacts in turn; their labels
    stay 0; every other subject is byte-identical to the same cohort without artefacts (the draw
    comes last), and each artefact changes its scan."""
    from pipelines.phantom.artefacts import ARTEFACTS, apply_artefact

    config = replace(SMALL, n_normal=6, n_lesion=1, n_consistent=0)
    plain = generate_cohort(tmp_path / "plain", config, progress=False)
    odd = generate_cohort(tmp_path / "odd", replace(config, artefact_scans=2, artefacts=("ghosting", "contrast")),
                          progress=False)
    kinds = {s: m["artefact"] for s, m in odd.info["subjects"].items() if m["artefact"]}
    assert sorted(kinds.values()) == ["contrast", "ghosting"] and set(kinds) <= set(odd.members("normal"))
    for subject in odd.subjects:
        ours = np.asarray(nib.load(odd.image(subject)).dataobj)
        theirs = np.asarray(nib.load(plain.image(subject)).dataobj)
        assert np.array_equal(ours, theirs) != (subject in kinds)
        assert np.array_equal(np.asarray(nib.load(odd.label(subject)).dataobj),
                              np.asarray(nib.load(plain.label(subject)).dataobj))
    rng = np.random.default_rng(0)
    image = np.asarray(nib.load(plain.image(plain.subjects[0])).dataobj).astype(np.float32)
    for name in ARTEFACTS:
        changed = apply_artefact(image, name, rng)
        assert changed.shape == image.shape and changed.min() >= 0 and not np.array_equal(changed, image)
    with pytest.raises(VolscanError, match="artefact scans must be within 0..6"):
        replace(config, artefact_scans=7).validate()
    with pytest.raises(VolscanError, match="artefacts must be among"):
        replace(config, artefacts=("blur",)).validate()


def test_atrophic_head_enlarges_the_ventricles_by_the_factor_and_thins_the_cortex():
    """`procedural_head(size, ventricle_factor, cortex_mm)`: CSF deep inside the brain (the
    ventricles) grows by the volume factor; cortical thinning turns surface tissue into CSF
    without touching the ventricles; the defaults give the template."""
    from scipy import ndimage

    base = procedural_head(80)
    deep = ndimage.distance_transform_edt(base.brain_mask, sampling=base.spacing) > 20.0

    def ventricles(head):
        return int(((head.image > 0.8) & deep).sum())

    def tissue(head):
        return int(((head.image < 0.8) & head.brain_mask).sum())

    assert np.array_equal(procedural_head(80, 1.0, 0.0).image, base.image)
    for factor in (1.5, 2.0):
        assert ventricles(procedural_head(80, factor, 0.0)) / ventricles(base) == pytest.approx(factor, rel=0.08)
    thin = procedural_head(80, 1.0, 2.0)
    assert ventricles(thin) == ventricles(base)
    assert tissue(thin) < 0.95 * tissue(base)
    assert np.array_equal(thin.brain_mask, base.brain_mask)


def test_normal_variation_subgroup_is_healthy_atrophic_and_leaves_the_others_unchanged(tmp_path):
    """`atrophy.fraction` of the healthy subjects are rendered from the atrophic head: group
    `normal`, labels all 0, marked in cohort.json; every other subject is byte-identical to the
    cohort without the subgroup; an atlas anatomy refuses it."""
    from pipelines.phantom import AtrophySettings
    from pipelines.phantom.cohort import build_anatomy

    config = replace(SMALL, n_normal=8, n_lesion=1, n_consistent=0)
    plain = generate_cohort(tmp_path / "plain", config, progress=False)
    varied = generate_cohort(tmp_path / "varied", replace(config, atrophy=AtrophySettings(0.25, 2.5, 2.0)),
                             progress=False)
    atrophic = [s for s, m in varied.info["subjects"].items() if m["atrophic"]]
    assert len(atrophic) == 2 and set(atrophic) <= set(varied.members("normal"))
    for subject in varied.subjects:
        ours = np.asarray(nib.load(varied.image(subject)).dataobj)
        theirs = np.asarray(nib.load(plain.image(subject)).dataobj)
        assert np.array_equal(ours, theirs) != (subject in atrophic)
        labels = np.asarray(nib.load(varied.label(subject)).dataobj)
        assert np.array_equal(labels, np.asarray(nib.load(plain.label(subject)).dataobj))
        if subject in atrophic:
            assert not labels.any()
    with pytest.raises(VolscanError, match="atrophy fraction"):
        replace(config, atrophy=AtrophySettings(fraction=1.5)).validate()
    with pytest.raises(VolscanError, match="procedural head"):
        build_anatomy(replace(config, template=str(tmp_path / "plain" / "template")), atrophic=True)


def test_site_profiles_give_each_site_its_noise_response_and_blur(tmp_path):
    """`site_profiles`: subjects go to sites in turn; each site's Rician noise floor in the
    background (mean magnitude sigma sqrt(pi / 2) of a zero signal, times the subject's scale)
    matches the site's drawn noise; `Site.respond` applies v -> v ** gamma and a blur that keeps
    the mean; without profiles every site has the cohort's noise and bias."""
    from pipelines.phantom import Site, SiteSettings

    config = replace(SMALL, n_normal=6, n_lesion=0, n_consistent=0, n_sites=2, warps=NO_WARP,
                     site_profiles=SiteSettings(noise=(0.02, 0.08)))
    cohort = generate_cohort(tmp_path / "sites", config, progress=False)
    sites = cohort.info["sites"]
    assert len(sites) == 2 and sites[0]["noise"] != sites[1]["noise"]
    for index, subject in enumerate(cohort.subjects):
        meta = cohort.info["subjects"][subject]
        assert meta["site"] == index % 2
        image = np.asarray(nib.load(cohort.image(subject)).dataobj).astype(float)
        corners = np.concatenate([image[:4, :4, :4].ravel(), image[-4:, -4:, -4:].ravel()])
        floor = corners.mean() / meta["intensity_scale"] / np.sqrt(np.pi / 2)
        assert floor == pytest.approx(sites[meta["site"]]["noise"], rel=0.15)
    site = Site(scale=1000.0, gamma=1.25, blur_mm=3.0)
    flat = np.full((16, 16, 16), 0.36, np.float32)
    assert np.allclose(site.respond(flat, np.ones(3)), 0.36 ** 1.25, rtol=1e-5)
    noisy = np.random.default_rng(0).uniform(0.2, 0.6, (24, 24, 24)).astype(np.float32)
    blurred = Site(scale=1.0, blur_mm=3.0).respond(noisy, np.ones(3))
    assert blurred.mean() == pytest.approx(noisy.mean(), rel=1e-3) and blurred.std() < 0.5 * noisy.std()
    plain = generate_cohort(tmp_path / "plain", replace(config, site_profiles=None, noise=0.04), progress=False)
    assert all(s["noise"] == 0.04 and s["gamma"] == 1.0 and s["bias"] == 0.15 for s in plain.info["sites"])


def test_cli_makes_sites_and_a_normal_variation_subgroup(tmp_path, capsys):
    """`volscan phantom --sites 2 --site-profiles --atrophy-fraction 0.5`: two sites with drawn
    profiles, scans in turn, half the healthy subjects atrophic and labelled healthy."""
    out = tmp_path / "c"
    assert main(["phantom", "-o", str(out), "--normal", "4", "--lesion", "1", "--consistent", "0", "--size", "40",
                 "--template", "procedural", "--sites", "2", "--site-profiles", "--atrophy-fraction", "0.5"]) == 0
    info = Cohort.load(out).info
    assert len(info["sites"]) == 2 and info["config"]["site_profiles"]["gamma"] == [0.8, 1.25]
    atrophic = [m for m in info["subjects"].values() if m["atrophic"]]
    assert len(atrophic) == 2 and all(m["group"] == "normal" and m["lesion_voxels"] == 0 for m in atrophic)
    assert [m["site"] for _, m in sorted(info["subjects"].items())] == [0, 1, 0, 1, 0]
    assert main(["phantom", "-o", str(tmp_path / "d"), "--atrophy-fraction", "2"]) == 2
    assert "atrophy fraction" in capsys.readouterr().err
