"""N4 bias-field correction against known fields: how much of the field each setting leaves.

Clean brains are multiplied by known smooth fields (`pipelines.phantom.warps.bias_field`: exp of
a random quadratic, log std ~ `--strength`, the phantom cohorts' default 0.15), corrected with
`preprocessing.bias_field.correct_bias_field` inside the brain mask, and compared with the clean
brain: the residual is the std over brain voxels of log(corrected / clean) (0 = field removed
exactly; the field's own std = nothing removed; above it = N4 made things worse by absorbing
anatomy). Brains:
- `sri24`: the SRI-24 T1 atlas (real anatomy; skull-stripped file, mask = its non-zero voxels);
- `phantom`: healthy procedural phantoms at `--cube`^3, rendered with bias strength 0 (elastic
  warps, noise and site scales kept), mask = the template's.
Per setting (number of fitting levels of 50 iterations) and brain kind: median and maximum
residual, and seconds per volume.

A second table asks what N4 takes from a lesion: a textured three-class brain (64^3 at 2.5 mm)
with one lesion 60 % brighter than the tissue it replaces, of 10-64 mm diameter, times a fixed
smooth field; per setting, the lesion's mean intensity change after correction (relative to the
brain's, so the overall level does not count) and the residual elsewhere.

    python benchmarks/bias_field.py --sri24 preprocessing/atlas/sri24 --phantoms 12 --fields 4
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipelines.phantom import PhantomConfig, WarpSettings, generate_cohort, procedural_head
from pipelines.phantom.warps import bias_field
from preprocessing.bias_field import N4Settings, correct_bias_field
from preprocessing.io import load_volume

log = logging.getLogger("bias_field_benchmark")


def residual(corrected: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """Std over `mask` of log(corrected / clean), voxels where both are positive (the field
    left, up to a constant factor that N4 cannot and need not know)."""
    inside = mask & (corrected > 0) & (clean > 0)
    return float(np.log(corrected[inside] / clean[inside]).std())


def brains(sri24: Path | None, phantoms: int, cube: int, seed: int, work: Path) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """(kind, clean image (X, Y, Z) float32, brain mask (X, Y, Z) bool, spacing mm) of every brain."""
    out = []
    if sri24 is not None:
        atlas = load_volume(sri24 / "sri24_t1_brats_skullstripped.nii.gz")
        image = atlas.array.astype(np.float32)
        out.append(("sri24", image, image > 0, tuple(atlas.spacing)))
    if phantoms:
        head = procedural_head(cube)
        # on the template grid, as the CoDeGraph ablation renders them (no pose, no registration)
        warps = WarpSettings(rotation_deg=0.0, scale_range=(1.0, 1.0), shift_mm=0.0, voxel_scale=(1.0, 1.0),
                             orientations=("".join(nib.aff2axcodes(head.affine)),))
        config = PhantomConfig(n_normal=phantoms, n_lesion=0, n_consistent=0, seed=seed, size=cube,
                               template="procedural", warps=warps, bias_strength=0.0)
        cohort = generate_cohort(work / "phantoms", config)
        brain = load_volume(cohort.template_dir / "brain_mask.nii.gz").array > 0
        for sid in cohort.subjects:
            scan = load_volume(cohort.image(sid))
            out.append(("phantom", scan.array.astype(np.float32), brain, tuple(scan.spacing)))
    return out


def lesion_loss(settings: N4Settings, diameter_mm: float, seed: int = 0) -> tuple[float, float]:
    """(relative intensity change inside a lesion of `diameter_mm`, residual log std elsewhere)
    after N4 with `settings` on the textured 64^3 phantom times exp(0.25x + 0.2y^2 - 0.15z + 0.1xz)."""
    n, voxel = 64, 2.5
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    brain = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.75) ** 2 < 1
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(n,) * 3), n / 24)
    low, high = np.quantile(texture[brain], [0.3, 0.7])
    tissue = np.where(texture < low, 40.0, np.where(texture < high, 70.0, 100.0))
    radius = diameter_mm / (n * voxel)  # in the [-1, 1] coordinates
    lesion = (x - 0.2) ** 2 + (y + 0.1) ** 2 + z**2 < radius**2
    tissue[lesion] *= 1.6
    clean = np.where(brain, ndimage.gaussian_filter(np.where(brain, tissue, 0.0), 0.7), 0.0).astype(np.float32)
    field = np.exp(0.25 * x + 0.2 * y**2 - 0.15 * z + 0.1 * x * z).astype(np.float32)
    log_ratio = np.log(correct_bias_field(clean * field, brain, (voxel,) * 3, settings)[brain] / clean[brain])
    log_ratio -= log_ratio.mean()
    inside = lesion[brain]
    return float(np.expm1(log_ratio[inside].mean())), float(log_ratio[~inside].std())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sri24", type=Path, default=None, help="folder with sri24_t1_brats_skullstripped.nii.gz")
    parser.add_argument("--phantoms", type=int, default=12, help="healthy phantom brains (0 = none)")
    parser.add_argument("--cube", type=int, default=224, help="phantom grid edge in voxels")
    parser.add_argument("--fields", type=int, default=4, help="random fields per brain")
    parser.add_argument("--strength", type=float, default=0.15, help="log-polynomial std of the fields")
    parser.add_argument("--levels", default="3,4", help="comma-separated numbers of fitting levels to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = {int(n): replace(N4Settings(), iterations=(50,) * int(n)) for n in args.levels.split(",")}
    rng = np.random.default_rng(args.seed)
    rows: dict[tuple[str, int], list[float]] = {}
    seconds: dict[tuple[str, int], list[float]] = {}
    field_std: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="volscan-n4-") as work:
        for kind, clean, mask, spacing in brains(args.sri24, args.phantoms, args.cube, args.seed, Path(work)):
            for _ in range(args.fields):
                field = bias_field(rng, clean.shape, args.strength)
                biased = clean * field
                field_std.setdefault(kind, []).append(residual(biased, clean, mask))
                for levels, n4 in settings.items():
                    start = time.perf_counter()
                    corrected = correct_bias_field(biased, mask, spacing, n4)
                    seconds.setdefault((kind, levels), []).append(time.perf_counter() - start)
                    rows.setdefault((kind, levels), []).append(residual(corrected, clean, mask))
    print("| brain | volumes | field log std (median) | levels | residual median | residual max | s / volume |")
    print("|---|---|---|---|---|---|---|")
    for (kind, levels), values in rows.items():
        print(f"| {kind} | {len(values)} | {np.median(field_std[kind]):.4f} | {levels} | {np.median(values):.4f} "
              f"| {np.max(values):.4f} | {np.median(seconds[kind, levels]):.1f} |")
    print("\n| levels | lesion diameter mm | lesion intensity change % | residual elsewhere |")
    print("|---|---|---|---|")
    for levels, n4 in settings.items():
        for diameter in (10, 20, 40, 64):
            change, rest = lesion_loss(n4, diameter, args.seed)
            print(f"| {levels} | {diameter} | {100 * change:+.1f} | {rest:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
