"""Synthetic cohorts with known answers: healthy, random-lesion and consistent-lesion subjects.

Layout written (the one `volscan screen --labels` and `resolve_template` read)::

    OUT/images/<id>.nii.gz       int16, each subject in its own grid (voxel size, voxel order)
    OUT/labels/<id>.nii.gz       uint8 on the same grid (0 healthy, 1 core, 2 edema, 3 rim)
    OUT/template/template.nii.gz + brain_mask.nii.gz   the unwarped anatomy
    OUT/cohort.json              seed, settings, groups, per-subject geometry and lesions

Groups: `normal` (no lesion), `lesion` (own random lesions), `consistent` (one shared lesion
pattern at one template location, each subject seeing it through its own warp: the case
CoDeGraph targets), `lookalike` (1-3 lesions each at random places, all sharing one appearance:
levels and core / rim fractions; the BraTS-METS vs IXI shape, where metastases look alike across
patients wherever they grow, so a third of a cohort carrying them vouch for each other in mutual
scoring). `lookalike_config` is that regime's preset. `artefact_scans` healthy subjects get a
whole-scan acquisition artefact (`artefacts.py`: ghosting, spike, wrap, missing slices, wrong
contrast) and stay labelled healthy. `atrophy.fraction` of the other healthy subjects (normal
variation: enlarged ventricles, thinner cortex; `anatomy.AtrophySettings`) are rendered from an
atrophic head and stay labelled healthy. `site_profiles` gives each scanner site its own
response curve, noise, blur and bias (`sites.py`). `registration_error_mm` gives every subject a
smooth residual warp of that largest size (`warps.ResidualWarp`: misregistration that
registration leaves behind, anatomy and lesions moved together). Subject ids are shuffled across groups so
the order says nothing.

Randomness: `SeedSequence(seed)` spawns one stream for cohort-level draws and one per subject,
so a subject depends only on (seed, its index, settings); the same seed gives identical files.
Options added later draw last or from a stream spawned after these, so a cohort without them
keeps its files.

Defaults (chosen): bias field strength 0.15 (log-polynomial std), Rician noise with sigma 3 % of
the CSF level, three "scanner sites" whose intensity scales are drawn log-uniformly in
400-3000 (IXI-like int16 ranges differ per site) with a +-10 % per-subject jitter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from pipelines.run_folder import AtomicOutputDir, atomic_write_text
from preprocessing.io import save_volume
from volumetric.errors import InputFileError, VolscanError

from .anatomy import Anatomy, AtrophySettings, load_atlas_anatomy, procedural_head
from .artefacts import ARTEFACTS, apply_artefact, check_artefacts
from .lesions import Lesion, LesionSettings, brain_depth, render_lesion, sample_lesion
from .sites import Site, SiteSettings, draw_sites
from .warps import (ResidualWarp, SubjectGeometry, WarpSettings, bias_field, sample_geometry, sample_residual,
                    template_points)

log = logging.getLogger(__name__)

GROUPS = ("normal", "lesion", "consistent", "lookalike")
LABEL_NAMES = {0: "background", 1: "necrotic core", 2: "edema", 3: "enhancing rim"}
# Named lesion contrasts (`LesionSettings.contrast`; see lesions.py for the levels they give).
CONTRASTS = {"subtle": 0.7, "t2": 1.0, "bright": 1.5}
FORMAT = "volscan-phantom/1"


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that determines a phantom cohort (see module docstrings for the defaults).

    `template`: "auto" (default: the resolved template, SRI-24 as installed unless configured;
    the procedural head if none resolves), "procedural" (built-in head, same on every machine) or a template folder. `size`: template grid edge in voxels
    (field of view 200 mm). `lesions_per_subject`: inclusive range for the `lesion` group;
    `lookalike_lesions`: the same for the `lookalike` group. `lesions` (radius, levels,
    `contrast`) applies to every group. `skull_stripped`: the procedural head without scalp, skull
    and background (subjects are zero outside their brain, as BraTS releases are); atlas anatomy
    is always skull-stripped. `artefact_scans`: healthy (`normal`) subjects given a whole-scan
    artefact (`artefacts.py`), the kinds of `artefacts` in turn; their labels stay healthy.
    `atrophy`: the normal-variation subgroup (a share of the other healthy subjects, procedural
    anatomy). `site_profiles`: per-site response curve, noise, blur and bias ranges (None: sites
    differ in intensity scale only, with `noise` and `bias_strength` for all).
    `registration_error_mm`: (min, max) largest displacement in mm of a smooth residual warp given
    to every subject (`warps.ResidualWarp`: misregistration left after registration; None: off).
    """

    n_normal: int = 20
    n_lesion: int = 5
    n_consistent: int = 5
    seed: int = 0
    size: int = 96
    template: str = "auto"
    lesions_per_subject: tuple[int, int] = (1, 1)
    bias_strength: float = 0.15
    noise: float = 0.03
    n_sites: int = 3
    site_scale: tuple[float, float] = (400.0, 3000.0)
    warps: WarpSettings = field(default_factory=WarpSettings)
    lesions: LesionSettings = field(default_factory=LesionSettings)
    n_lookalike: int = 0
    lookalike_lesions: tuple[int, int] = (1, 3)
    skull_stripped: bool = False
    artefact_scans: int = 0
    artefacts: tuple[str, ...] = ARTEFACTS
    atrophy: AtrophySettings = field(default_factory=AtrophySettings)
    site_profiles: SiteSettings | None = None
    registration_error_mm: tuple[float, float] | None = None

    def validate(self) -> None:
        """Raise VolscanError on settings that cannot make a cohort."""
        counts = (self.n_normal, self.n_lesion, self.n_consistent, self.n_lookalike)
        if min(counts) < 0 or sum(counts) == 0:
            raise VolscanError("subject counts must be >= 0 and not all zero, got "
                               f"normal/lesion/consistent/lookalike = {counts}")
        if self.n_consistent == 1:
            raise VolscanError("a consistent group needs at least 2 subjects (or 0)")
        for what, (lo, hi) in (("lesions per subject", self.lesions_per_subject),
                               ("look-alike lesions per subject", self.lookalike_lesions)):
            if not 1 <= lo <= hi:
                raise VolscanError(f"{what} must satisfy 1 <= min <= max, got {lo}..{hi}")
        self.lesions.validate()
        if self.size < 32 or self.size > 512:
            raise VolscanError(f"--size must be in 32..512 voxels, got {self.size}")
        if not 0 <= self.artefact_scans <= self.n_normal:
            raise VolscanError(f"artefact scans must be within 0..{self.n_normal} (the healthy subjects), "
                               f"got {self.artefact_scans}")
        check_artefacts(tuple(self.artefacts))
        if self.noise < 0 or self.bias_strength < 0 or self.n_sites < 1:
            raise VolscanError("noise and bias strength must be >= 0 and there must be at least one site")
        self.atrophy.validate()
        if self.atrophy_count() > self.n_normal - self.artefact_scans:
            raise VolscanError("the atrophic subgroup and the artefact scans must fit in the healthy subjects")
        if self.site_profiles is not None:
            self.site_profiles.validate()
        if self.registration_error_mm is not None:
            lo, hi = self.registration_error_mm
            if not 0 <= lo <= hi:
                raise VolscanError(f"registration error must satisfy 0 <= min <= max mm, got {lo}..{hi}")

    def atrophy_count(self) -> int:
        """Healthy subjects of the normal-variation subgroup: `atrophy.fraction` of `n_normal`, rounded."""
        return int(round(self.atrophy.fraction * self.n_normal))


@dataclass
class Cohort:
    """A phantom cohort on disk: `root`, subject ids in file order and each id's group."""

    root: Path
    groups: dict[str, str]
    info: dict

    @property
    def subjects(self) -> list[str]:
        """Subject ids, sorted."""
        return sorted(self.groups)

    @property
    def images_dir(self) -> Path:
        """OUT/images (the folder to screen)."""
        return self.root / "images"

    @property
    def labels_dir(self) -> Path:
        """OUT/labels (for `volscan screen --labels`)."""
        return self.root / "labels"

    @property
    def template_dir(self) -> Path:
        """OUT/template (for `volscan screen --template`)."""
        return self.root / "template"

    def image(self, subject: str) -> Path:
        """Path of one subject's image."""
        return self.images_dir / f"{subject}.nii.gz"

    def label(self, subject: str) -> Path:
        """Path of one subject's label map (same grid as its image)."""
        return self.labels_dir / f"{subject}.nii.gz"

    def members(self, group: str) -> list[str]:
        """Sorted ids of one group ("normal", "lesion", "consistent" or "lookalike")."""
        return sorted(s for s, g in self.groups.items() if g == group)

    @classmethod
    def load(cls, root: str | Path) -> "Cohort":
        """Read a cohort written by `generate_cohort` (raises InputFileError if it is not one)."""
        path = Path(root) / "cohort.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputFileError(path, f"not a phantom cohort description ({exc})") from None
        if info.get("format") != FORMAT:
            raise InputFileError(path, f"unknown format {info.get('format')!r}, expected {FORMAT}")
        groups = {sid: meta["group"] for sid, meta in info["subjects"].items()}
        return cls(Path(root), groups, info)


def lookalike_config(n_subjects: int = 60, *, contrast: float = 1.0, radius_mm: tuple[float, float] = (12.0, 20.0),
                     lesions_per_subject: tuple[int, int] = (1, 3), seed: int = 0, size: int = 96,
                     template: str = "procedural") -> PhantomConfig:
    """The look-alike regime: `n_subjects // 3` scans with 1-3 look-alike lesions at random places, the rest healthy.

    `contrast` multiplies the lesion levels (`CONTRASTS`: 0.7 subtle, 1.0 T2-like, 1.5 brighter than
    CSF); `radius_mm` is the outer radius range (12-20 mm fills whole 14^3 cubes at 112^3-224^3).
    """
    n_lookalike = n_subjects // 3
    return PhantomConfig(n_normal=n_subjects - n_lookalike, n_lesion=0, n_consistent=0, n_lookalike=n_lookalike,
                         seed=seed, size=size, template=template, lookalike_lesions=tuple(lesions_per_subject),
                         lesions=LesionSettings(radius_mm=tuple(radius_mm), contrast=contrast))


def build_anatomy(config: PhantomConfig, atrophic: bool = False) -> Anatomy:
    """The cohort's template anatomy for `config.template` ("procedural", "auto" or a folder);
    `atrophic`: the normal-variation head of `config.atrophy` (procedural anatomy only)."""
    if config.template == "procedural":
        head = (procedural_head(config.size, config.atrophy.ventricle_factor, config.atrophy.cortex_mm) if atrophic
                else procedural_head(config.size))
        source = "procedural, atrophic" if atrophic else "procedural"
        if not config.skull_stripped:
            return Anatomy(head.image, head.brain_mask, head.affine, source)
        return Anatomy(np.where(head.brain_mask, head.image, 0.0).astype(np.float32), head.brain_mask, head.affine,
                       f"{source}, skull-stripped", skull_stripped=True)
    if config.template == "auto":
        try:
            anatomy = load_atlas_anatomy(None, config.size)
        except (VolscanError, ImportError) as exc:
            log.info("no SRI-24 template resolved (%s); using the procedural head", exc)
            return build_anatomy(replace(config, template="procedural"), atrophic)
    else:
        anatomy = load_atlas_anatomy(config.template, config.size)
    if atrophic:
        raise VolscanError(f"normal variation (atrophy) needs the procedural head (--template procedural); "
                           f"the anatomy here is {anatomy.source}")
    return anatomy


def render_subject(anatomy: Anatomy, geometry: SubjectGeometry, lesions: list[Lesion],
                   rng: np.random.Generator, site: Site, scale: float,
                   residual: ResidualWarp | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject on its native grid, as `site`'s scanner sees it (response curve, blur,
    bias strength, noise); `residual`: a registration error moving anatomy and lesions together.

    Returns the image (geometry.shape) float32 in scanner units (CSF ~ `scale`) and the label
    map (geometry.shape) uint8.
    """
    points = template_points(geometry, anatomy)
    if residual is not None:
        points = residual.apply(points, anatomy)
    vox = anatomy.world_to_voxel(points)
    image = ndimage.map_coordinates(anatomy.image, vox, order=1, cval=0.0)
    brain = ndimage.map_coordinates(anatomy.brain_mask.astype(np.float32), vox, order=0, cval=0.0) > 0.5
    labels = np.zeros(image.shape, np.uint8)
    for lesion in lesions:
        lesion_labels, alpha, level = render_lesion(lesion, points)
        alpha *= brain
        image = image * (1.0 - alpha) + level * alpha
        labels = np.where((labels == 0) & brain, lesion_labels, labels)
    spacing = np.sqrt((geometry.affine[:3, :3] ** 2).sum(axis=0))
    image = site.respond(image.reshape(geometry.shape), spacing) * bias_field(rng, geometry.shape, site.bias)
    sigma = site.noise
    # Rician magnitude noise, as in magnitude MR images.
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    if anatomy.skull_stripped:
        image *= brain.reshape(geometry.shape)
    return (image * scale).astype(np.float32), labels.reshape(geometry.shape)


def generate_cohort(out_dir: str | Path, config: PhantomConfig = PhantomConfig(), *, force: bool = False,
                    progress: bool = True) -> Cohort:
    """Generate a phantom cohort into `out_dir` (layout in the module docstring) and return it.

    The cohort is written to a temporary sibling folder and moved into place at the end
    (`pipelines.run_folder.AtomicOutputDir`), so an interrupted run never leaves a folder that looks
    complete. An existing `out_dir` is replaced only with `force=True`, and only if it is empty or
    itself a phantom cohort.
    """
    config.validate()
    out_dir = Path(out_dir)
    output = AtomicOutputDir(out_dir, force, command="phantom")  # checks OUT before any work
    anatomy = build_anatomy(config)
    group_list = np.array(["normal"] * config.n_normal + ["lesion"] * config.n_lesion
                          + ["consistent"] * config.n_consistent + ["lookalike"] * config.n_lookalike)
    root = np.random.SeedSequence(config.seed)
    seeds = root.spawn(1 + len(group_list))
    cohort_rng = np.random.default_rng(seeds[0])
    group_list = group_list[cohort_rng.permutation(len(group_list))]
    site_scales = np.exp(cohort_rng.uniform(*np.log(config.site_scale), config.n_sites))
    # A stream spawned after the subjects' own: cohorts without site profiles keep their files.
    sites = draw_sites(np.random.default_rng(root.spawn(1)[0]), site_scales, config.site_profiles, config.noise,
                       config.bias_strength)
    # Per-subject residual warps from a stream spawned last, only when asked for: cohorts without
    # them keep their files.
    residual_seeds = root.spawn(1)[0].spawn(len(group_list)) if config.registration_error_mm else None
    depth = brain_depth(anatomy)
    shared = sample_lesion(cohort_rng, anatomy, config.lesions, depth) if config.n_consistent else None
    # Drawn after the consistent lesion, so cohorts without look-alikes keep their old random streams.
    look = sample_lesion(cohort_rng, anatomy, config.lesions, depth) if config.n_lookalike else None
    # Drawn last, so cohorts without artefact scans keep their old random streams.
    artefact_of = {}
    if config.artefact_scans:
        healthy = np.flatnonzero(group_list == "normal")
        chosen = sorted(cohort_rng.choice(healthy, config.artefact_scans, replace=False).tolist())
        artefact_of = {int(i): config.artefacts[j % len(config.artefacts)] for j, i in enumerate(chosen)}
    # Drawn after the artefact scans, among the other healthy subjects.
    atrophic: set[int] = set()
    if config.atrophy_count():
        healthy = [int(i) for i in np.flatnonzero(group_list == "normal") if int(i) not in artefact_of]
        atrophic = set(cohort_rng.choice(healthy, config.atrophy_count(), replace=False).tolist())
    atrophic_anatomy = build_anatomy(config, atrophic=True) if atrophic else None

    with output as tmp:
        save_volume((anatomy.image * 1000.0).astype(np.float32), anatomy.affine, tmp / "template" / "template.nii.gz")
        save_volume(anatomy.brain_mask.astype(np.uint8), anatomy.affine, tmp / "template" / "brain_mask.nii.gz")
        width = max(3, len(str(len(group_list) - 1)))
        subjects = {}
        for index, group in enumerate(tqdm(group_list, desc="phantom subjects", disable=not progress)):
            subject = f"sub-{index:0{width}d}"
            rng = np.random.default_rng(seeds[1 + index])
            site = index % config.n_sites if config.site_profiles is not None else None  # in turn
            residual = (None if residual_seeds is None else sample_residual(
                np.random.default_rng(residual_seeds[index]), config.registration_error_mm,
                config.warps.control_points))
            subjects[subject] = _write_subject(tmp, subject, str(group), rng,
                                               atrophic_anatomy if index in atrophic else anatomy, config, shared,
                                               look, depth, sites, site, artefact_of.get(index), residual)
            subjects[subject]["atrophic"] = index in atrophic
        info = {"format": FORMAT, "seed": config.seed, "anatomy": anatomy.source, "config": _jsonable(config),
                "label_names": LABEL_NAMES, "groups": {g: sorted(s for s, m in subjects.items() if m["group"] == g)
                                                      for g in GROUPS},
                "sites": [site.to_dict() for site in sites],
                "consistent_lesion": shared.to_dict() if shared else None,
                "lookalike_appearance": ({"levels": look.levels, "core_fraction": look.core_fraction,
                                          "rim_fraction": look.rim_fraction} if look else None),
                "subjects": subjects}
        atomic_write_text(tmp / "cohort.json", json.dumps(info, indent=1))
    log.info("phantom cohort: %d subjects in %s", len(subjects), out_dir)
    return Cohort.load(out_dir)


def _write_subject(folder: Path, subject: str, group: str, rng: np.random.Generator, anatomy: Anatomy,
                   config: PhantomConfig, shared: Lesion | None, look: Lesion | None, depth: np.ndarray,
                   sites: list[Site], site_index: int | None = None, artefact: str | None = None,
                   residual: ResidualWarp | None = None) -> dict:
    """Draw, render and save one subject into folder/{images,labels}; return its cohort.json entry.
    `site_index`: the subject's site (None: drawn from its stream); `artefact`: a whole-scan
    artefact applied after rendering (drawn from the subject's stream last); `residual`: its
    registration error (None: none)."""
    geometry = sample_geometry(rng, anatomy, config.warps)
    drawn = int(rng.integers(config.n_sites))  # drawn either way: the stream stays the same
    site = drawn if site_index is None else site_index
    scale = float(sites[site].scale * rng.uniform(0.9, 1.1))
    if group == "lesion":
        count = int(rng.integers(config.lesions_per_subject[0], config.lesions_per_subject[1] + 1))
        lesions = [sample_lesion(rng, anatomy, config.lesions, depth) for _ in range(count)]
    elif group == "lookalike":
        count = int(rng.integers(config.lookalike_lesions[0], config.lookalike_lesions[1] + 1))
        lesions = [sample_lesion(rng, anatomy, config.lesions, depth, appearance=look) for _ in range(count)]
    else:
        lesions = [shared] if group == "consistent" and shared is not None else []
    image, labels = render_subject(anatomy, geometry, lesions, rng, sites[site], scale, residual)
    if artefact is not None:
        image = apply_artefact(image, artefact, rng)
    save_volume(np.clip(np.rint(image), 0, np.iinfo(np.int16).max), geometry.affine,
                folder / "images" / f"{subject}.nii.gz", dtype=np.int16)
    save_volume(labels, geometry.affine, folder / "labels" / f"{subject}.nii.gz")
    if lesions and not (labels > 0).any():
        log.warning("%s: its lesion fell outside the field of view; it is labelled healthy", subject)
    entry = {"group": group, "site": site, "artefact": artefact, "intensity_scale": round(scale, 3), "lesion_voxels": int((labels > 0).sum()),
             **geometry.describe(), "lesions": [lesion.to_dict() for lesion in lesions]}
    if residual is not None:
        entry["registration_error_mm"] = round(residual.magnitude_mm, 4)
    return entry


def _jsonable(config: PhantomConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))
