"""Cache bytes per scan and the scores' change: compact storage (cubes as scaled int16, tokens as
float16) against float32 storage of both, on a phantom cohort.

Cohort: `volscan demo`'s (12 healthy + 6 look-alike lesion scans, procedural head at 64^3,
registered and skull-stripped), generated into OUT/cohort. Each storage mode screens it twice
with the same settings into its own cache: the first run fills the cache, the second scores
from it (what every later run does). Float32 storage is the storage before compaction,
obtained here by making the store write float32 cubes (`save_volume` without `scaled_int16`)
and the token cache float32 files (`STORAGE_DTYPE`). Reported per feature set: the cache's
bytes per scan (preprocessing store, token files) for each mode, and between the two modes'
second runs the largest absolute and relative difference of a scan score, the scans whose
rank changed, patient AUROC of each.

    python benchmarks/cache_storage.py --out /tmp/cache-bench --size 84 --features classical tiny-vit
    python benchmarks/cache_storage.py --out /tmp/cache-bench224 --size 224 --features classical --scans 4
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipelines.cache_files import folder_bytes
from pipelines.demo import DEMO_COHORT
from pipelines.phantom import generate_cohort
from pipelines.screen import run_screen
from pipelines.screen_config import ScreenConfig

# The tests' tiny random ViT-S/14 (three blocks, width 48): ViT tokens without pretrained weights.
TINY_VIT = {"backbone": "vit_small_patch14_dinov2", "weights": "random",
            "backbone_kwargs": {"depth": 3, "embed_dim": 48, "num_heads": 2}}


@contextmanager
def float32_storage() -> Iterator[None]:
    """The store writes float32 cubes and the token cache float32 files, as before compaction."""
    import preprocessing.cohort
    import volumetric.token_cache

    save = preprocessing.cohort.save_volume

    def full(*args: object, scaled_int16: bool = False, **kwargs: object) -> Path:
        return save(*args, **(dict(kwargs, dtype=np.float32) if scaled_int16 else kwargs))

    preprocessing.cohort.save_volume, volumetric.token_cache.STORAGE_DTYPE = full, torch.float32
    try:
        yield
    finally:
        preprocessing.cohort.save_volume, volumetric.token_cache.STORAGE_DTYPE = save, torch.float16


def screen_twice(images: Path, labels: Path, template: Path, out: Path, config: ScreenConfig) -> dict[str, tuple]:
    """Fill a fresh cache, then score from it; {id: (score, rank)} of the second run and its AUROC."""
    shutil.rmtree(out, ignore_errors=True)
    for run in ("fill", "cached"):
        result = run_screen(images, out / run, config, labels_dir=labels)
    with open(out / "cached" / "scores.csv", encoding="utf-8") as handle:
        rows = {r["id"]: (float(r["score"]), int(r["rank"])) for r in csv.DictReader(handle)}
    return {"rows": rows, "auroc": (result.metrics or {}).get("patient_auroc"),
            "store": folder_bytes(out / "cache" / "preprocess"), "tokens": folder_bytes(out / "cache" / "tokens")}


def main() -> None:
    """Generate the cohort, screen it in both storage modes, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (cohort, caches, runs)")
    parser.add_argument("--size", type=int, default=84, help="cube edge (default 84, the demo's)")
    parser.add_argument("--scans", type=int, default=0, help="screen only the first N scans (default: all 18)")
    parser.add_argument("--features", nargs="+", choices=("classical", "tiny-vit"), default=["classical", "tiny-vit"])
    args = parser.parse_args()
    cohort = args.out / "cohort"
    if not cohort.exists():
        generate_cohort(cohort, DEMO_COHORT, progress=False)
    images, labels = cohort / "images", cohort / "labels"
    if args.scans:
        images, labels = args.out / f"first-{args.scans}" / "images", args.out / f"first-{args.scans}" / "labels"
        for source, target in ((cohort / "images", images), (cohort / "labels", labels)):
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted(source.iterdir())[: args.scans]:
                shutil.copy(path, target / path.name)
    print(f"cohort: {len(list(images.iterdir()))} phantom scans of volscan demo, cube {args.size}; "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
    for features in args.features:
        extra = {"backbone": "classical"} if features == "classical" else TINY_VIT
        results = {}
        for mode in ("float32", "compact"):
            run = args.out / f"{features}-{mode}"
            config = ScreenConfig(size=args.size, registered=True, skull_stripped=True, template=str(cohort / "template"),
                                  cache=str(run / "cache"), device="cpu", **extra)
            if mode == "float32":
                with float32_storage():
                    results[mode] = screen_twice(images, labels, cohort / "template", run, config)
            else:
                results[mode] = screen_twice(images, labels, cohort / "template", run, config)
        n = len(results["compact"]["rows"])
        for mode, result in results.items():
            print(f"{features:9s} {mode:8s} store {result['store'] / n / 1e6:8.3f} MB/scan, tokens "
                  f"{result['tokens'] / n / 1e6:8.3f} MB/scan, total {(result['store'] + result['tokens']) / n / 1e6:8.3f} "
                  f"MB/scan; patient AUROC {result['auroc']}")
        full, compact = results["float32"]["rows"], results["compact"]["rows"]
        diff = {sid: abs(full[sid][0] - compact[sid][0]) for sid in full}
        worst = max(diff, key=diff.get)
        moved = {sid: (full[sid][1], compact[sid][1]) for sid in full if full[sid][1] != compact[sid][1]}
        print(f"{features:9s} max |score difference| {diff[worst]:.3g} ({worst}: {full[worst][0]:.6g} vs "
              f"{compact[worst][0]:.6g}, relative {diff[worst] / abs(full[worst][0]):.2e}); "
              f"rank changes (float32 -> compact): {moved or 'none'}")


if __name__ == "__main__":
    main()
