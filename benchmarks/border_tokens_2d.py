"""Do 2D frame tokens score like interior ones? A blob cohort screened with classical features.

Writes `--healthy` grey textures (a smooth random field of s.d. `--texture` grey levels plus
noise s.d. 6, on 120) and `--blobs` more with one bright Gaussian blob (amplitude `--amplitude`,
radius side / 14) away from the frame, with blob masks, into OUT/cohort; screens them with
`volscan screen --backbone classical` (CoDeGraph, the screen's defaults) into OUT/run; prints
the blob images' ranks, the image AUROC and, over the healthy images, the mean token score of
the frame ring, its corners and edges against the interior (docs/engine.md, "Border tokens in
2D"). `--lnamd-border zero` gives MuSc's zero padding instead of the 2D default.

    python benchmarks/border_tokens_2d.py -o /tmp/border2d --side 112 --seed 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.cli import main as volscan


def blob_cohort(root: Path, healthy: int, blobs: int, side: int, seed: int, texture: float, amplitude: float) -> set[str]:
    """Write images/ and labels/ under `root`; returns the blob images' ids (shuffled among all)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = [f"img{i:02d}" for i in range(healthy + blobs)]
    blob_ids = set()
    for k, i in enumerate(rng.permutation(len(ids))):
        field = ndimage.gaussian_filter(rng.normal(0, 1, (side, side)), side / 24)
        image = 120 + texture * field / field.std() + rng.normal(0, 6, (side, side))
        if k < blobs:
            centre = rng.uniform(0.25 * side, 0.75 * side, 2)
            rows, cols = np.mgrid[:side, :side]
            d2 = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (side / 14) ** 2
            image = image + amplitude * np.exp(-d2 / 2)
            Image.fromarray(np.where(d2 <= 2.0, 255, 0).astype(np.uint8)).save(root / "labels" / f"{ids[i]}.png")
            blob_ids.add(ids[i])
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{ids[i]}.png")
    return blob_ids


def main() -> None:
    """Make the cohort, screen it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="new folder for the cohort and the run")
    parser.add_argument("--healthy", type=int, default=10)
    parser.add_argument("--blobs", type=int, default=3)
    parser.add_argument("--side", type=int, default=112, help="image side and model input size (multiple of 14)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--texture", type=float, default=15.0)
    parser.add_argument("--amplitude", type=float, default=100.0)
    parser.add_argument("--lnamd-border", choices=("shift", "zero"), default=None)
    args = parser.parse_args()
    blob_ids = blob_cohort(args.out / "cohort", args.healthy, args.blobs, args.side, args.seed, args.texture,
                           args.amplitude)
    argv = ["screen", str(args.out / "cohort" / "images"), "--labels", str(args.out / "cohort" / "labels"),
            "--backbone", "classical", "--size", str(args.side), "--device", "cpu", "--cache", str(args.out / "cache"),
            "-o", str(args.out / "run")]
    if args.lnamd_border:
        config = args.out / "config.toml"
        config.write_text(f'[scoring]\nlnamd_border = "{args.lnamd_border}"\n', encoding="utf-8")
        argv += ["--config", str(config)]
    if volscan(argv) != 0:
        raise SystemExit("screen failed")
    report = json.loads((args.out / "run" / "report.json").read_text(encoding="utf-8"))
    with np.load(args.out / "run" / "elements.npz") as data:
        ids, scores = [str(i) for i in data["ids"]], data["element_scores"]
    healthy = scores[[i for i, sid in enumerate(ids) if sid not in blob_ids]]
    frame = np.ones(healthy.shape[1:], dtype=bool)
    frame[1:-1, 1:-1] = False
    corners = np.zeros_like(frame)
    corners[[0, 0, -1, -1], [0, -1, 0, -1]] = True
    interior = healthy[:, ~frame].mean()
    print(f"blob images' ranks: {sorted(s['rank'] for s in report['subjects'] if s['id'] in blob_ids)}; "
          f"image AUROC {report['metrics']['image_auroc']:.3f}")
    print(f"healthy images, mean token score / interior: frame {healthy[:, frame].mean() / interior:.2f}, "
          f"corners {healthy[:, corners].mean() / interior:.2f}, edges {healthy[:, frame & ~corners].mean() / interior:.2f}")


if __name__ == "__main__":
    main()
