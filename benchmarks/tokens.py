"""Token extraction benchmarks. Random weights throughout: speed does not depend on their values,
and distortions are relative to the same model's full-precision / full-pooling tokens.

speed: per backbone and precision, side by side in one run (interleaved, repeated; medians),
on `--slices` slices (one 14-slice block by default) of the SRI-24 cube read from disk:
slices/s, the speed-up over fp32 of each repetition's pair, per-token cosine to the fp32
tokens, the extrapolated time per S^3 volume (3 S slices less the all-zero ones) and
volumes/s, the share of time per stage (read, prepare = checks + [0, 1] map + void, slice =
batching + normalisation + host-to-device, backbone, pool, project) and the device idle
share (time the backbone is not running). Prints the load average: the machine may be shared.

    python benchmarks/tokens.py speed --backbones vit_small_patch14_dinov2 vit_large_patch14_dinov2 \
        --precisions fp32 auto --repeats 3

blocks: token distortion of `slices_per_block=K` against full pooling, on six collections
(the SRI-24 cube and five transformed copies): each slice is encoded once, then pooled with
every K; prints the median / p95 relative error of the nearest-collection distance d(x, J),
how often the nearest token stays the same, and the Spearman correlation of a mutual score
(mean over J of d(x, J)), for projected tokens (r = 128, the engine's input).

    python benchmarks/tokens.py blocks --size 112 --ks 1 2 4 7

norm: the effect of the backbone's final norm on the tokens (statistics and score ranks).

jl: nearest-collection distance distortion of the JL projection for several r.

    python benchmarks/tokens.py jl --backbone vit_small_patch14_dinov2 --size 112 --dims 32 64 128 256

fine: extraction time per volume of the 7-voxel ViT grid (`patch=7`: slices upsampled 2x,
7-slice blocks) against the 14-voxel path, side by side in one run (interleaved, repeated;
medians of wall and CPU seconds per volume), on the SRI-24 cube; and how much a small bright
blob (radius `--blob` voxels, +`--contrast` on the [0, 1] scale, in white matter) moves the token
of its cell relative to the median distance between the same cells of the two volumes: the
dilution a coarse cube suffers, and why a coarse-to-fine scheme that refines only the top coarse
cubes would not see it.

    python benchmarks/tokens.py fine --backbone vit_small_patch14_dinov2 --size 112 --repeats 3

gpu: one self-contained script for a CUDA machine (no SRI-24, no nibabel needed; <= 8 min on
an H100/H200): ViT-L/14 at 224^3, synthetic brain-like volumes read from .npy files; volumes/s
per slice batch, a stream of volumes with and without the prefetching loader (volumes/s, GPU
idle share from CUDA events), then torch.compile; writes a JSON summary after every step.

    PYTHONUNBUFFERED=1 python3 benchmarks/tokens.py gpu --out $OUT/gpu_tokens.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SRI24 = REPO.parent / "shared" / "data" / "sri24" / "sri24_t1_brats_skullstripped.nii.gz"
STAGES = ("read", "prepare", "slice", "backbone", "pool", "project")


def atlas_cube(size: int) -> np.ndarray:
    """The skull-stripped SRI-24 atlas read from disk, cropped around the brain, resized to (S, S, S)."""
    from preprocessing.crop_resize import brain_crop_box, crop_and_resize
    from preprocessing.io import load_volume

    volume = load_volume(SRI24)
    box = brain_crop_box(volume.array > 0, volume.affine)
    return crop_and_resize(volume.array, volume.affine, box, size).astype(np.float32)


def blank_slices(unit: torch.Tensor) -> int:
    """All-zero slices of a cube over its three axes (the tokenizer skips them)."""
    return sum(int((~unit.movedim(a, 0).reshape(unit.shape[0], -1).any(1)).sum()) for a in range(3))


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of matching rows of (..., D) tensors, flattened."""
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]).double(),
                                                 b.reshape(-1, b.shape[-1]).double(), dim=1)


def stage_report(seconds: dict[str, float]) -> str:
    """'read 1.0 %, prepare ..., project ...; device idle X %' for one volume's stage times."""
    total = sum(seconds.values())
    shares = ", ".join(f"{s} {100 * seconds[s] / total:.2f} %" for s in STAGES)
    return f"{shares}; device idle {100 * (1 - seconds['backbone'] / total):.1f} %"


def run_speed(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.devices import cpu_has_native_bf16
    from volumetric.tokens import VolumeTokenizer

    device = torch.device(args.device)
    reads = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cube = atlas_cube(args.size)
        reads.append(time.perf_counter() - t0)
    read_s = statistics.median(reads)
    print(f"device={device} size={args.size} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"native_bf16={cpu_has_native_bf16()} load average at start {os.getloadavg()}")
    print(f"read (NIfTI load + crop + resize to {args.size}^3): median {read_s:.2f} s of {args.repeats}")
    for name in args.backbones:
        extra = {} if args.init_values is None else {"init_values": args.init_values}
        model = create_backbone(name, weights="random", device=device, **extra)
        toks = {p: VolumeTokenizer(model, slice_batch=args.slice_batch, precision=p, progress=False)
                for p in args.precisions}
        first = next(iter(toks.values()))
        prepared = first.prepare(cube)
        unit = prepared.unit.to(device)
        mid = args.size // 2 - args.slices // 2
        slices = unit[mid:mid + args.slices]  # brain slices from the middle of the cube
        per_slice = torch.arange(args.slices)
        rates: dict[str, list[float]] = {p: [] for p in toks}
        cpu_rates: dict[str, list[float]] = {p: [] for p in toks}  # per CPU-second: robust to sharing
        stages: dict[str, dict[str, float]] = {}
        features: dict[str, list[torch.Tensor]] = {}
        for tok in toks.values():  # warm-up: allocations, kernels, the blank image
            tok.encode(slices[: tok.slice_batch], per_slice[: tok.slice_batch], tok.slice_batch)
        for rep in range(args.repeats):
            for precision, tok in toks.items():
                tok.timer.reset()
                t0 = time.perf_counter()
                tok.prepare(cube)
                cpu0 = time.process_time()
                sums = tok.encode(slices, per_slice, args.slices)  # per-slice features
                cpu_rates[precision].append(args.slices / (time.process_time() - cpu0))
                # one 14-slice block mean per layer -> (g, g, C) tokens, projected as in a volume
                tokens = [tok.project(s[: tok.patch].mean(0).movedim(0, -1)) for s in sums]
                t = tok.timer.totals()
                rates[precision].append(args.slices / (t["slice_s"] + t["backbone_s"] + t["pool_s"]))
                if rep == 0:
                    features[precision] = [s.cpu() for s in sums] + [x.cpu() for x in tokens]
                    scale = (3 * args.size - blank_slices(prepared.unit)) / args.slices
                    token_scale = 3 * (args.size // tok.patch) ** 3 / tokens[0].shape[0] ** 2
                    stages[precision] = {"read": read_s, "prepare": t["prepare_s"], "slice": t["slice_s"] * scale,
                                         "backbone": t["backbone_s"] * scale, "pool": t["pool_s"] * scale,
                                         "project": t["project_s"] * token_scale}
                log.debug("%s %s rep %d: %.2f s", name, precision, rep, time.perf_counter() - t0)
        base = args.precisions[0]
        for precision, tok in toks.items():
            med = statistics.median(rates[precision])
            ratios = [a / b for a, b in zip(rates[precision], rates[base])]
            volume_s = sum(stages[precision].values())
            n_layers = len(tok.layers)
            cos_feat = min(float(cosine_per_token(a.movedim(1, -1), b.movedim(1, -1)).min())
                           for a, b in zip(features[precision][:n_layers], features[base][:n_layers]))
            cos_tok = min(float(cosine_per_token(a, b).min())
                          for a, b in zip(features[precision][n_layers:], features[base][n_layers:]))
            print(f"{name} {precision} ({str(tok.dtype).removeprefix('torch.')}, batch {tok.slice_batch}): "
                  f"{med:.3f} slices/s (median of {args.repeats}: {', '.join(f'{r:.3f}' for r in rates[precision])}); "
                  f"x{statistics.median(ratios):.2f} vs {base} (median of paired ratios); "
                  f"{statistics.median(cpu_rates[precision]):.3f} slices per CPU-second "
                  f"(x{statistics.median(cpu_rates[precision]) / statistics.median(cpu_rates[base]):.2f}); "
                  f"min per-token cosine to {base}: patch features {cos_feat:.6f}, tokens {cos_tok:.6f}; "
                  f"{volume_s:.0f} s per {args.size}^3 volume = {1 / volume_s:.5f} volumes/s (extrapolated); "
                  f"{stage_report(stages[precision])}")
        del model, toks
    print(f"load average at end {os.getloadavg()}")


def with_blob(cube: np.ndarray, centre: tuple[int, int, int], radius: float, contrast: float) -> np.ndarray:
    """A copy of `cube` with a ball of `radius` voxels at `centre` brightened by `contrast` times
    the brain's 1..99 percentile range (a small lesion)."""
    lo, hi = np.percentile(cube[cube != 0], (1, 99))
    grid = np.indices(cube.shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
    out = cube.copy()
    out[ball & (cube != 0)] += contrast * (hi - lo)
    return out


def blob_signal(clean: list[torch.Tensor], blob: list[torch.Tensor], cell: tuple[int, int, int]) -> float:
    """Distance between the blob cell's tokens of the two volumes over the median distance of all
    cells (layers concatenated): > 1 means the blob moved its cell more than a typical cell moved."""
    a, b = torch.cat(clean, -1), torch.cat(blob, -1)
    dist = (a - b).norm(dim=-1)
    typical = dist.flatten().median().clamp_min(1e-12)
    return float(dist[cell] / typical)


def run_fine(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.tokens import VolumeTokenizer

    cube = atlas_cube(args.size)
    brain = np.argwhere(cube > np.percentile(cube[cube != 0], 75))  # bright (white-matter-like) voxels
    centre = tuple(int(v) for v in brain[len(brain) // 2])
    blobbed = with_blob(cube, centre, args.blob, args.contrast)
    model = create_backbone(args.backbone, weights="random", init_values=1.0)
    toks = {c: VolumeTokenizer(model, precision=args.precision, progress=False, patch=c) for c in (14, 7)}
    print(f"cpu threads={torch.get_num_threads()} torch={torch.__version__} backbone={args.backbone} "
          f"size={args.size} precision {next(iter(toks.values())).dtype}; blob radius {args.blob} at {centre}; "
          f"load average at start {os.getloadavg()}")
    for tok in toks.values():  # warm-up: allocations, kernels, the blank image
        tok(cube[: tok.cube * 2, : tok.cube * 2, : tok.cube * 2] + 1.0)
    wall: dict[int, list[float]] = {c: [] for c in toks}
    cpu: dict[int, list[float]] = {c: [] for c in toks}
    signal: dict[int, float] = {}
    for rep in range(args.repeats):
        for c, tok in toks.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = tok(blobbed)
            wall[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)
            if rep == 0:
                clean = tok(cube)
                signal[c] = blob_signal(clean.layers, tokens.layers, tuple(v // c for v in centre))
                grid = tokens.grid
            log.debug("patch %d rep %d: %.2f s", c, rep, wall[c][-1])
            print(f"  rep {rep} patch {c}: {wall[c][-1]:.2f} s wall, {cpu[c][-1]:.2f} s CPU", flush=True)
        if rep == 0:
            print(f"  grids: 14 -> {toks[14](cube).grid}, 7 -> {grid}")
    for c in toks:
        print(f"patch {c}: {statistics.median(wall[c]):.2f} s wall per volume (median of {args.repeats}: "
              f"{', '.join(f'{w:.2f}' for w in wall[c])}), {statistics.median(cpu[c]):.2f} CPU-s; "
              f"blob cell moved {signal[c]:.2f}x the median cell")
    ratios = [f / g for f, g in zip(wall[7], wall[14])]
    cpu_ratios = [f / g for f, g in zip(cpu[7], cpu[14])]
    print(f"7-voxel / 14-voxel: x{statistics.median(ratios):.2f} wall (median of paired ratios), "
          f"x{statistics.median(cpu_ratios):.2f} CPU; load average at end {os.getloadavg()}")


def _nearest(x: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(x.double(), bank.double())
    return distances.min(dim=1)


def atlas_variants(size: int) -> dict[str, np.ndarray]:
    """Six 'collections': the SRI-24 cube and five transformed copies of it."""
    from scipy.ndimage import gaussian_filter, shift

    cube = atlas_cube(size)
    rng = np.random.default_rng(0)
    brain = cube > 0
    return {
        "atlas": cube,
        "flipped": cube[::-1].copy(),
        "shifted": shift(cube, (3, -2, 2), order=1),
        "gamma": np.where(brain, (cube / cube.max()) ** 0.8 * cube.max(), 0).astype(np.float32),
        "noisy": np.where(brain, cube + rng.normal(0, 0.05 * cube[brain].std(), cube.shape), 0).astype(np.float32),
        "smoothed": np.where(brain, gaussian_filter(cube, 1.0), 0).astype(np.float32),
    }


def distortion(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """(median, p95 of |d'/d - 1|, share of same nearest token, Spearman of mean d(x, J)) of
    `other` collections' tokens (M_i, D) against `reference`, over ordered pairs I != J."""
    from scipy.stats import spearmanr

    errors, same, score_ref, score_other = [], [], [], []
    for i in range(len(reference)):
        s_ref = torch.zeros(len(reference[i]), dtype=torch.float64)
        s_other = torch.zeros_like(s_ref)
        for j in range(len(reference)):
            if i != j:
                d, idx = _nearest(reference[i], reference[j])
                d2, idx2 = _nearest(other[i], other[j])
                errors.append((d2 / d - 1).abs())
                same.append((idx == idx2).double())
                s_ref += d
                s_other += d2
        score_ref.append(s_ref)
        score_other.append(s_other)
    err = torch.cat(errors)
    rho = spearmanr(torch.cat(score_ref).numpy(), torch.cat(score_other).numpy()).statistic
    return float(err.median()), float(err.quantile(0.95)), float(100 * torch.cat(same).mean()), float(rho)


def run_blocks(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.tokens import VolumeTokenizer, block_offsets

    model = create_backbone(args.backbone, weights="random")
    tok = VolumeTokenizer(model, progress=False)
    p = tok.patch
    per_slice_feats, valid = [], []  # per collection: per axis, per layer (S, C, g, g)
    t0 = time.perf_counter()
    for vol in atlas_variants(args.size).values():
        prepared = tok.prepare(vol)
        axes = []
        for axis in range(3):
            slices = prepared.unit.movedim(axis, 0)
            axes.append(tok.encode(slices, torch.arange(args.size), args.size))
        per_slice_feats.append(axes)
        valid.append(~prepared.void)
    print(f"backbone={args.backbone} random weights, {tok.dtype}, layers {tok.layers}, size={args.size}, r={tok.proj_dim}, "
          f"{len(valid)} collections, {sum(int(v.sum()) for v in valid)} non-void tokens; "
          f"encoded in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")

    def tokens_for(k: int | None) -> list[list[torch.Tensor]]:
        """Per layer, per collection: (M_i, 3r) non-void tokens pooled from K slices per block."""
        offsets = torch.tensor(block_offsets(p, k))
        out: list[list[torch.Tensor]] = [[] for _ in tok.layers]
        for axes, v in zip(per_slice_feats, valid):
            for li in range(len(tok.layers)):
                parts = []
                for axis, layers in enumerate(axes):
                    feats = layers[li]  # (S, C, g, g)
                    g = feats.shape[0] // p
                    pooled = feats.view(g, p, *feats.shape[1:])[:, offsets].mean(1)  # (g, C, g, g)
                    parts.append(tok.project(pooled.movedim(1, -1).movedim(0, axis)))
                out[li].append(torch.cat(parts, -1)[v])
        return out

    full = tokens_for(None)
    print("| K (slices per block) | work | layer | median \\|d'/d − 1\\| | p95 | same nearest token | Spearman of score |")
    print("|---|---|---|---|---|---|---|")
    for k in args.ks:
        for li, (ref, other) in enumerate(zip(full, tokens_for(k))):
            med, p95, same, rho = distortion(ref, other)
            print(f"| {k} | {k}/{p} = {k / p:.2f} | {tok.layers[li]} | {med:.4f} | {p95:.4f} | {same:.1f} % | {rho:.4f} |")


def run_norm(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.tokens import VolumeTokenizer

    model = create_backbone(args.backbone, weights="random")
    tok = VolumeTokenizer(model, final_norm=False, progress=False)
    p = tok.patch
    pooled: dict[str, list[list[torch.Tensor]]] = {"norm": [], "raw": []}  # per collection, per layer (M, 3, C)
    for vol in atlas_variants(args.size).values():
        prepared = tok.prepare(vol)
        per_label: dict[str, list[list[torch.Tensor]]] = {"norm": [[] for _ in tok.layers],
                                                          "raw": [[] for _ in tok.layers]}
        for axis in range(3):
            # each slice once, without the norm; the final norm applied here per patch token
            sums = tok.encode(prepared.unit.movedim(axis, 0), torch.arange(args.size), args.size)
            for li, raw in enumerate(sums):  # (S, C, g, g)
                with torch.inference_mode():
                    normed = model.norm(raw.movedim(1, -1)).movedim(-1, 1)
                for label, feats in (("raw", raw), ("norm", normed)):
                    g = feats.shape[0] // p
                    block = feats.view(g, p, *feats.shape[1:]).mean(1).movedim(1, -1).movedim(0, axis)
                    per_label[label][li].append(block[~prepared.void])  # (M, C)
        for label in pooled:
            pooled[label].append([torch.stack(axes, 1) for axes in per_label[label]])
    print(f"backbone={args.backbone} random weights (final norm: gamma = 1, beta = 0 as initialised), "
          f"{tok.dtype}, size={args.size}, layers {tok.layers}, load average {os.getloadavg()}")
    for li, layer in enumerate(tok.layers):
        tokens = {}
        for label in ("raw", "norm"):
            feats = torch.cat([c[li] for c in pooled[label]]).reshape(-1, pooled[label][0][li].shape[-1])
            norms = feats.norm(dim=-1)
            top = feats.var(0).sort(descending=True).values
            print(f"layer {layer} {label}: block-mean feature norm cv {float(norms.std() / norms.mean()):.3f}, "
                  f"max/median {float(norms.max() / norms.median()):.2f}; top 1 % channels hold "
                  f"{100 * float(top[: max(1, len(top) // 100)].sum() / top.sum()):.1f} % of the variance")
            tokens[label] = [torch.cat(list(tok.project(c[li]).movedim(1, 0)), -1) for c in pooled[label]]
        med, p95, same, rho = distortion(tokens["raw"], tokens["norm"])
        print(f"layer {layer}: norm vs raw tokens: d(x, J) change median {med:.4f}, p95 {p95:.4f}; "
              f"same nearest token {same:.1f} %; Spearman of score {rho:.4f}")


def run_jl(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.projection import jl_matrix
    from volumetric.tokens import VolumeTokenizer

    model = create_backbone(args.backbone, weights="random", **({} if not args.tiny else
                                                             dict(depth=3, embed_dim=192, num_heads=3)))
    tok = VolumeTokenizer(model, progress=False)
    if not 0 <= args.layer < len(tok.layers):
        raise SystemExit(f"--layer must index the default layers {tok.layers} (0..{len(tok.layers) - 1})")
    raw, valid = [], []
    for vol in atlas_variants(args.size).values():
        prepared = tok.prepare(vol)
        feats = tok.pooled(prepared.unit)[args.layer]  # (3, g, g, g, C)
        raw.append(torch.nn.functional.normalize(feats, dim=-1))
        valid.append(~prepared.void)
    in_dim = raw[0].shape[-1]
    full = [torch.cat(list(f), -1)[v] for f, v in zip(raw, valid)]  # (M_i, 3C)
    print(f"backbone={args.backbone}{' (tiny)' if args.tiny else ''} random weights, layer {tok.layers[args.layer]}, "
          f"C={in_dim}, size={args.size}, {len(full)} collections, {sum(len(f) for f in full)} non-void tokens")
    for r in args.dims:
        matrix = jl_matrix(in_dim, r, args.seed)
        proj = [torch.cat(list(f @ matrix), -1)[v] for f, v in zip(raw, valid)]
        med, p95, same, rho = distortion(full, proj)
        print(f"r={r:4d} (width {3 * r:5d}): |d'/d-1| median {med:.4f}, p95 {p95:.4f}; "
              f"same nearest token {same:.1f} %; Spearman(score) {rho:.4f}")


def synthetic_cube(size: int, seed: int) -> np.ndarray:
    """A brain-like test cube: an ellipsoid of smooth random texture on a zero background."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size // 8, size // 8, size // 8, generator=gen)
    texture = torch.nn.functional.interpolate(noise, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]
    axis = (torch.arange(size, dtype=torch.float32) - size / 2) / (size / 2)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    inside = (z / 0.8) ** 2 + (y / 0.9) ** 2 + (x / 0.75) ** 2 < 1
    return (100 + 50 * texture).mul_(inside).numpy().astype(np.float32)


def run_gpu(args: argparse.Namespace) -> None:
    from volumetric.backbones import create_backbone
    from volumetric.prefetch import prefetch
    from volumetric.tokens import VolumeTokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu: torch sees no CUDA device")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    import timm

    summary: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "timm": timm.__version__, "backbone": args.backbone, "size": args.size}
    out = Path(args.out) if args.out else None

    def record(key: str, value: object) -> None:
        summary[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if out is not None:
            out.write_text(json.dumps(summary, indent=1))

    model = create_backbone(args.backbone, weights="random", device=device)
    tok = VolumeTokenizer(model, progress=False)  # precision auto = bf16 on Hopper
    record("precision", str(tok.dtype))
    folder = Path(tempfile.mkdtemp(prefix="volscan_gpu_bench_"))
    paths = []
    for i in range(args.volumes):
        paths.append(folder / f"vol{i}.npy")
        np.save(paths[-1], synthetic_cube(args.size, i))

    def one_volume_rate(label: str, repeats: int = 3) -> float:
        tok(np.load(paths[0]))  # warm-up (and compile, where compiled)
        sync()
        t0 = time.perf_counter()
        for i in range(repeats):
            tok(np.load(paths[i % len(paths)]))
        sync()
        rate = repeats / (time.perf_counter() - t0)
        record(f"volumes_per_s[{label}]", round(rate, 3))
        return rate

    rates = {}
    for batch in args.batches:
        tok.slice_batch = batch
        rates[batch] = one_volume_rate(f"batch {batch}")
    best = max(rates, key=rates.get)
    tok.slice_batch = best
    record("best_batch", best)

    def stream(use_prefetch: bool) -> None:
        jobs = [lambda p=p: tok.prepare(np.load(p)) for p in paths]
        tok.timer.reset()
        sync()
        t0 = time.perf_counter()
        loader = prefetch(jobs, depth=args.workers + 1, workers=args.workers) if use_prefetch else (j() for j in jobs)
        for prepared in loader:
            tok.extract(prepared)
        sync()
        wall = time.perf_counter() - t0
        t = tok.timer.totals()
        record(f"stream[{'prefetch' if use_prefetch else 'serial'}]", {
            "volumes": len(paths), "wall_s": round(wall, 3), "volumes_per_s": round(len(paths) / wall, 3),
            "gpu_idle_share": round(1 - t["backbone_s"] / wall, 4),
            "stage_s": {k: round(v, 3) for k, v in t.items() if k.endswith("_s")},
            "slices": t.get("slices", 0), "skipped_slices": t.get("skipped_slices", 0)})

    stream(use_prefetch=False)
    stream(use_prefetch=True)
    if args.compile:
        t0 = time.perf_counter()
        try:
            tok.compile()
            one_volume_rate(f"batch {best}, torch.compile")
            record("compile_and_measure_s", round(time.perf_counter() - t0, 1))
        except Exception as exc:  # report, never lose the eager figures above
            record("compile_error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    for path in paths:
        path.unlink()
    folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    speed = sub.add_parser("speed", help="slices/s, volumes/s and stage shares per backbone and precision")
    speed.add_argument("--backbones", nargs="+", default=["vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
                                                           "vit_large_patch14_dinov2"])
    speed.add_argument("--precisions", nargs="+", default=["fp32", "auto"],
                       help="the first is the reference for speed-up and cosine")
    speed.add_argument("--size", type=int, default=224)
    speed.add_argument("--slices", type=int, default=14, help="slices timed per repetition (>= 14)")
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--slice-batch", type=int, default=None)
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--init-values", type=float, default=None,
                       help="LayerScale init of the random model: DINOv2's 1e-5 makes every block nearly the "
                            "identity, so the cosine check then sees the patch embedding only; 1.0 makes blocks count")
    blocks = sub.add_parser("blocks", help="token distortion of slices_per_block K vs full pooling")
    blocks.add_argument("--backbone", default="vit_small_patch14_dinov2")
    blocks.add_argument("--size", type=int, default=112)
    blocks.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 7])
    norm = sub.add_parser("norm", help="token statistics with and without the backbone's final norm")
    norm.add_argument("--backbone", default="vit_small_patch14_dinov2")
    norm.add_argument("--size", type=int, default=112)
    jl = sub.add_parser("jl", help="nearest-collection distance distortion of the JL projection vs r")
    jl.add_argument("--backbone", default="vit_small_patch14_dinov2")
    jl.add_argument("--tiny", action="store_true", help="3-block, 192-wide model (quick)")
    jl.add_argument("--size", type=int, default=112)
    jl.add_argument("--layer", type=int, default=0, help="which of the tokenizer's default layers")
    jl.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    jl.add_argument("--seed", type=int, default=0)
    fine = sub.add_parser("fine", help="7-voxel ViT grid (slices upsampled 2x) vs 14: time per volume, blob signal")
    fine.add_argument("--backbone", default="vit_small_patch14_dinov2")
    fine.add_argument("--size", type=int, default=112)
    fine.add_argument("--repeats", type=int, default=3)
    fine.add_argument("--precision", default="auto")
    fine.add_argument("--blob", type=float, default=3.0, help="blob radius in voxels")
    fine.add_argument("--contrast", type=float, default=0.5, help="blob brightening, in brain 1..99 %% ranges")
    gpu = sub.add_parser("gpu", help="ViT-L at 224^3 on CUDA: volumes/s, GPU idle share, prefetch, compile")
    gpu.add_argument("--backbone", default="vit_large_patch14_dinov2")
    gpu.add_argument("--size", type=int, default=224)
    gpu.add_argument("--volumes", type=int, default=16)
    gpu.add_argument("--batches", type=int, nargs="+", default=[128, 224, 448])
    gpu.add_argument("--workers", type=int, default=4, help="prefetch threads preparing the next volumes")
    gpu.add_argument("--no-compile", dest="compile", action="store_false")
    gpu.add_argument("--device", default="cuda", help="cpu only to smoke-test this script with a small --size")
    gpu.add_argument("--out", default=None, help="JSON summary, rewritten after every step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    {"speed": run_speed, "blocks": run_blocks, "norm": run_norm, "jl": run_jl, "fine": run_fine, "gpu": run_gpu}[args.mode](args)
    return 0


log = logging.getLogger("benchmarks.tokens")

if __name__ == "__main__":
    sys.exit(main())
