"""Wall time per volume of the full preprocessing chain at 224³ on the SRI-24 atlas.

Makes `--n` IXI-like raw scans in code: the SRI-24 head warped by known affines (rotation up to
10°, scale 0.95–1.08, shifts up to 8 mm), stored on 0.94 x 0.94 x 1.2 mm grids in PIR / LPS voxel
orders with arbitrary scanner scales. Runs `preprocess_cohort` (register, template brain mask,
crop, resize, Nyúl learn + apply, all files written), then reports seconds per volume, a stage
breakdown on one volume, and the registration error (mm, worst corner of a brain-sized box).

    python benchmarks/preprocess.py --n 4 --size 224 [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from preprocessing.intensity import learn_landmarks, standardize
from preprocessing.io import Volume, load_volume, save_volume
from preprocessing.cohort import preprocess_cohort
from preprocessing.registration import prepare_image, register_affine
from preprocessing.resample import resample_to_grid
from preprocessing.settings import PreprocessSettings
from preprocessing.template import load_template
from preprocessing.volume import VolumePreprocessor

ATLAS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sri24"


def make_scan(template, seed: int, codes: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, RAS affine, input→template world matrix) of one synthetic raw scan."""
    rng = np.random.default_rng(seed)
    tmpl = template.image
    centre = tmpl.affine[:3, :3] @ ((np.array(tmpl.array.shape) - 1) / 2) + tmpl.affine[:3, 3]
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix() * rng.uniform(0.95, 1.08)
    world[:3, 3] = centre - world[:3, :3] @ centre + rng.uniform(-8, 8, 3)
    spacing = {"P": 0.94, "A": 0.94, "I": 1.2, "S": 1.2, "R": 0.94, "L": 0.94}
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    shape = tuple(150 if code in "IS" else 256 for code in codes)
    rotation = np.zeros((3, 3))
    for out_axis, code in enumerate(codes):
        axis, sign = axes[code]
        rotation[axis, out_axis] = sign * spacing[code]
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = centre - rotation @ ((np.array(shape) - 1) / 2)
    image = resample_to_grid(tmpl.array, tmpl.affine, shape, affine, world=world, order=1)
    return (image * rng.uniform(0.1, 10)).astype(np.float32), affine, world


def corner_error_mm(residual: np.ndarray, centre: np.ndarray) -> float:
    """Largest displacement (mm) by `residual` of the corners of a 130 x 170 x 130 mm box."""
    corners = np.array([[x, y, z, 1.0] for x in (-65, 65) for y in (-85, 85) for z in (-65, 65)])
    corners[:, :3] += centre
    return float(np.linalg.norm((residual @ corners.T).T[:, :3] - corners[:, :3], axis=1).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="number of synthetic scans")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--template", type=Path, default=ATLAS)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes for the cohort run")
    parser.add_argument("--brain-mask", default="template", help="brain extractor (see benchmarks/brain_mask.py)")
    args = parser.parse_args(argv)
    settings = PreprocessSettings(size=args.size, brain_mask=args.brain_mask)
    template = load_template(args.template)
    centre = template.image.affine @ np.r_[(np.array(template.image.array.shape) - 1) / 2, 1]
    with tempfile.TemporaryDirectory(prefix="volscan-bench-") as tmp:
        tmp = Path(tmp)
        truths = {}
        for i in range(args.n):
            image, affine, world = make_scan(template, i, "PIR" if i % 2 == 0 else "LPS")
            save_volume(image, affine, tmp / "in" / f"scan_{i:02d}.nii.gz")
            truths[f"scan_{i:02d}"] = world
        paths = sorted((tmp / "in").iterdir())
        start, cpu_start = time.perf_counter(), time.process_time()
        result = preprocess_cohort(paths, tmp / "out", settings, template=template, workers=args.workers)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        errors = {
            r.id: corner_error_mm(r.load_mapping().template_to_native @ truths[r.id], centre[:3]) for r in result.records
        }
        # Stage breakdown on the first scan.
        pre = VolumePreprocessor(settings, template)
        stages = {}
        t = time.perf_counter()
        volume = load_volume(paths[0])
        stages["load"] = time.perf_counter() - t
        t = time.perf_counter()
        fixed = prepare_image(template.image.array, template.image.affine, settings.registration)
        stages["prepare_template (once per cohort)"] = time.perf_counter() - t
        t = time.perf_counter()
        register_affine(prepare_image(volume.array, volume.affine, settings.registration), fixed, settings.registration)
        stages["register"] = time.perf_counter() - t
        t = time.perf_counter()
        spatial = pre(Volume(volume.array, volume.affine))
        stages["full spatial chain (incl. register)"] = time.perf_counter() - t
        t = time.perf_counter()
        standardize(spatial.cube, spatial.brain_mask, learn_landmarks([(spatial.cube, spatial.brain_mask)]))
        stages["nyul learn+apply"] = time.perf_counter() - t
    report = {
        "volumes": args.n,
        "workers": args.workers,
        "size": args.size,
        "brain_mask": args.brain_mask,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "seconds_per_volume_full_chain": total / args.n,
        "seconds_total": total,
        # CPU seconds of this process (all its threads; workers' CPU is not included): a
        # contention-free measure when the machine is shared.
        "cpu_seconds_per_volume_this_process": cpu / args.n,
        "stage_seconds_one_volume": stages,
        "registration_error_mm_worst_corner": errors,
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
