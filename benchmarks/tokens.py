"""Token extraction benchmarks: speed (slices/s, volumes/s, time shares) and JL distortion vs r.

speed: for each backbone, the tokenizer's own batched encoder on `--slices` slices of an SRI-24
cube (S x S each), or on the whole cube with `--full`; prints slices/s, the extrapolated
time per S^3 volume (3 S slices), volumes/s, and the share of time in the backbone versus
block pooling and JL projection. Random weights: speed does not depend on their values.

    python benchmarks/tokens.py speed --backbones vit_small_patch14_dinov2 vit_base_patch14_dinov2 \
        vit_large_patch14_dinov2 --size 224 --slices 28

jl: nearest-collection distance distortion of the JL projection for several r, on real token
sets (SRI-24 atlas cube and transformed copies of it, i.e. several "collections"). For each
non-void token x of collection I and each other collection J, d(x, J) = min over J's non-void
tokens, computed on the unprojected tokens (three L2-normalised C-dim axis features) and on
the projected tokens (width 3r). Prints the median / 95th percentile of |d'/d - 1|, how often
the nearest token in J is the same, and the Spearman correlation of the mean d(x, J) (a
mutual-scoring-like score) between the two spaces.

    python benchmarks/tokens.py jl --backbone vit_small_patch14_dinov2 --size 112 --dims 32 64 128 256
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SRI24 = REPO.parent / "shared" / "data" / "sri24" / "sri24_t1_brats_skullstripped.nii.gz"


def atlas_cube(size: int) -> np.ndarray:
    """The skull-stripped SRI-24 atlas cropped around the brain and resized to (S, S, S)."""
    from preprocessing.crop_resize import brain_crop_box, crop_and_resize
    from preprocessing.io import load_volume

    volume = load_volume(SRI24)
    box = brain_crop_box(volume.array > 0, volume.affine)
    return crop_and_resize(volume.array, volume.affine, box, size).astype(np.float32)


def run_speed(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.tokens import VolumeTokenizer, unit_intensities

    cube = torch.from_numpy(atlas_cube(args.size))
    unit = unit_intensities(cube, cube != 0)
    print(f"device={args.device} size={args.size} threads={torch.get_num_threads()} torch={torch.__version__}")
    for name in args.backbones:
        model = create_backbone(name, weights="random", device=args.device)
        tok = VolumeTokenizer(model, slice_batch=args.slice_batch, progress=False)
        tok.encode(unit[: tok.slice_batch])  # warm-up (allocations, kernels)
        tok.timing = dict.fromkeys(tok.timing, 0)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if args.full:
            start = time.perf_counter()
            tok(cube)
            volume_s = time.perf_counter() - start
            slices = tok.timing["slices"]
            extrapolate = 1.0
        else:
            slices = args.slices
            feats = tok.encode(unit[:slices], block=tok.patch)
            for feat in feats:  # project real pooled features; scaled to a whole volume below
                tok.project(feat.movedim(1, -1))
            extrapolate = 3 * args.size / slices
            volume_s = sum(tok.timing[k] for k in ("backbone_s", "pool_s", "project_s")) * extrapolate
        # Shared machines: the CPU time this process got says how contended the wall time was.
        busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        t = tok.timing
        total = t["backbone_s"] + t["pool_s"] + t["project_s"]
        rate = slices / (t["backbone_s"] + t["pool_s"])
        print(f"{name}: {rate:.2f} slices/s ({slices} slices, batch {tok.slice_batch}), "
              f"{volume_s:.1f} s/volume = {1 / volume_s:.4f} volumes/s "
              f"({'measured' if args.full else f'extrapolated x{extrapolate:.0f}'}); "
              f"backbone {100 * t['backbone_s'] / total:.1f} %, pooling {100 * t['pool_s'] / total:.2f} %, "
              f"projection {100 * t['project_s'] / total:.2f} %; {busy:.2f} cores busy on average "
              f"= {rate / busy:.2f} slices per CPU-second")
        del model, tok


def _nearest(x: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(x.double(), bank.double())
    return distances.min(dim=1)


def run_jl(args: argparse.Namespace) -> None:
    from scipy.ndimage import gaussian_filter, shift
    from scipy.stats import spearmanr

    from volumetric.backbones import create_backbone
    from volumetric.projection import jl_matrix
    from volumetric.tokens import VolumeTokenizer, unit_intensities, void_from_mask

    cube = atlas_cube(args.size)
    rng = np.random.default_rng(0)
    brain = cube > 0
    variants = {
        "atlas": cube,
        "flipped": cube[::-1].copy(),
        "shifted": shift(cube, (3, -2, 2), order=1),
        "gamma": np.where(brain, (cube / cube.max()) ** 0.8 * cube.max(), 0).astype(np.float32),
        "noisy": np.where(brain, cube + rng.normal(0, 0.05 * cube[brain].std(), cube.shape), 0).astype(np.float32),
        "smoothed": np.where(brain, gaussian_filter(cube, 1.0), 0).astype(np.float32),
    }
    model = create_backbone(args.backbone, weights="random", **({} if not args.tiny else
                                                             dict(depth=3, embed_dim=192, num_heads=3)))
    tok = VolumeTokenizer(model, progress=False)
    if not 0 <= args.layer < len(tok.layers):
        raise SystemExit(f"--layer must index the default layers {tok.layers} (0..{len(tok.layers) - 1})")
    raw, valid = [], []
    for name, vol in variants.items():
        t = torch.from_numpy(np.ascontiguousarray(vol))
        mask = t != 0
        feats = tok.pooled(unit_intensities(t, mask))[args.layer]  # (3, g, g, g, C)
        normed = torch.nn.functional.normalize(feats, dim=-1)
        raw.append(normed)
        valid.append(~void_from_mask(mask, tok.patch, tok.void_fraction))
    in_dim = raw[0].shape[-1]
    full = [torch.cat(list(f), -1)[v] for f, v in zip(raw, valid)]  # (M_i, 3C)
    ref_d, ref_idx = {}, {}
    for i, x in enumerate(full):
        for j, bank in enumerate(full):
            if i != j:
                ref_d[i, j], ref_idx[i, j] = _nearest(x, bank)
    print(f"backbone={args.backbone}{' (tiny)' if args.tiny else ''} random weights, layer {tok.layers[args.layer]}, "
          f"C={in_dim}, size={args.size}, {len(full)} collections, {sum(len(f) for f in full)} non-void tokens")
    for r in args.dims:
        matrix = jl_matrix(in_dim, r, args.seed)
        proj = [torch.cat(list(f @ matrix), -1)[v] for f, v in zip(raw, valid)]
        errors, same = [], []
        score_full = [torch.zeros(len(f), dtype=torch.float64) for f in full]
        score_proj = [torch.zeros(len(f), dtype=torch.float64) for f in full]
        for (i, j), d in ref_d.items():
            d_proj, idx_proj = _nearest(proj[i], proj[j])
            errors.append((d_proj / d - 1).abs())
            same.append((idx_proj == ref_idx[i, j]).double())
            score_full[i] += d
            score_proj[i] += d_proj
        err = torch.cat(errors)
        rho = spearmanr(torch.cat(score_full).numpy(), torch.cat(score_proj).numpy()).statistic
        print(f"r={r:4d} (width {3 * r:5d}): |d'/d-1| median {err.median():.4f}, p95 {err.quantile(0.95):.4f}; "
              f"same nearest token {100 * torch.cat(same).mean():.1f} %; Spearman(score) {rho:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    speed = sub.add_parser("speed", help="slices/s and volumes/s per backbone")
    speed.add_argument("--backbones", nargs="+", default=["vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
                                                           "vit_large_patch14_dinov2"])
    speed.add_argument("--size", type=int, default=224)
    speed.add_argument("--slices", type=int, default=28, help="slices timed per backbone (extrapolated)")
    speed.add_argument("--full", action="store_true", help="tokenize the whole cube instead of --slices")
    speed.add_argument("--slice-batch", type=int, default=None)
    speed.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    jl = sub.add_parser("jl", help="nearest-collection distance distortion of the JL projection vs r")
    jl.add_argument("--backbone", default="vit_small_patch14_dinov2")
    jl.add_argument("--tiny", action="store_true", help="3-block, 192-wide model (quick)")
    jl.add_argument("--size", type=int, default=112)
    jl.add_argument("--layer", type=int, default=0, help="which of the tokenizer's default layers")
    jl.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    jl.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    (run_speed if args.mode == "speed" else run_jl)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
