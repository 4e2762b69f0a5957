"""The per-scan stage (`volscan extract`) on a local Ray cluster: 1 vs 2 workers, and Ray's cost per scan.

A phantom cohort of `--scans` raw scans (each on its own grid, so the spatial phase really
registers them to the phantom's template) goes through the whole per-scan stage (spatial ->
landmarks -> tokens) with a random-weight ViT, each time into a fresh cache:

- `local`: in this process, one after the other, torch on one thread (what one Ray worker gets);
- `ray-1` / `ray-2`: a local Ray cluster with 1 or 2 CPUs, one CPU per scan, i.e. 1 or 2
  workers. `cold` = first run on a new cluster (workers start, import torch and build the
  model); `warm` = a second run on the same cluster (workers and model already there).

Ray's overhead per scan, two ways: (ray-1 warm - local) / scans, the same single-threaded
compute on both sides (on a loaded machine this is within the noise), and the round trip of a
job that does nothing (`round trip`: the same arguments, plan reference and outcome as a scan's
job, on the warm cluster; per scan, 2 phases). The speed-up of two workers = ray-1 warm / ray-2 warm. Repeated `--reps` times, alternating the
cluster sizes so load drifts into both; the load average is printed (shared machines).

    python benchmarks/extract_ray.py --scans 8 --reps 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # per-volume bars of the tokenizer (also in Ray workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8, help="phantom scans in the cohort (default 8)")
    parser.add_argument("--phantom-size", type=int, default=64, help="phantom grid edge in voxels (default 64)")
    parser.add_argument("--size", type=int, default=56, help="cube edge S, multiple of 14 (default 56)")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm ViT, random weights")
    parser.add_argument("--depth", type=int, default=6, help="ViT blocks (default 6)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the whole comparison (default 2)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="volscan-ray-bench-") as scratch:
        run(args, args.workdir or Path(scratch))


def run(args: argparse.Namespace, work: Path) -> None:
    import ray
    import torch

    from pipelines.distributed.extract import ExtractSettings, run_extract
    from pipelines.distributed.runners import RaySettings
    from pipelines.subjects import discover_subjects
    from pipelines.phantom import PhantomConfig, generate_cohort
    from pipelines.screen_config import ScreenConfig

    cohort = work / "cohort"
    generate_cohort(cohort, PhantomConfig(n_normal=args.scans, n_lesion=0, n_consistent=0, size=args.phantom_size,
                                          template="procedural"), force=True, progress=False)
    subjects, _ = discover_subjects(cohort / "images")
    runs = iter(range(10_000))

    def config() -> ScreenConfig:
        cache = work / f"cache-{next(runs)}"  # always a fresh cache: nothing is found done
        return ScreenConfig(backbone=args.backbone, weights="random", size=args.size, device="cpu",
                            template=str(cohort / "template"), cache=str(cache),
                            backbone_kwargs={"depth": args.depth})

    def timed(settings: ExtractSettings) -> float:
        start = time.perf_counter()
        result = run_extract(subjects, config(), settings)
        if result.failed:
            raise SystemExit(f"{len(result.failed)} scan(s) failed: {result.failed[0].error}")
        return time.perf_counter() - start

    torch.set_num_threads(1)  # the same compute per scan as a one-CPU Ray worker (OMP_NUM_THREADS=1)
    print(f"cohort: {args.scans} phantom scans ({args.phantom_size}^3, registered to the phantom template), "
          f"cube {args.size}, {args.backbone} depth {args.depth} (random weights), CPU; "
          f"ray {ray.__version__}, {os.cpu_count()} cores; load average before: {_load()}")
    timed(ExtractSettings(progress=False))  # warm-up: imports, first model build, page cache
    rows: dict[str, list[float]] = {}
    for rep in range(args.reps):
        rows.setdefault("local", []).append(timed(ExtractSettings(progress=False)))
        for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):
            start = time.perf_counter()
            ray.init(num_cpus=workers, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
            rows.setdefault(f"ray-{workers} cluster start", []).append(time.perf_counter() - start)
            settings = ExtractSettings(ray=RaySettings(), progress=False)
            rows.setdefault(f"ray-{workers} cold", []).append(timed(settings))
            rows.setdefault(f"ray-{workers} warm", []).append(timed(settings))
            rows.setdefault(f"ray-{workers} round trip per scan", []).append(_round_trip(ray, subjects))
            ray.shutdown()
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()) + f"; load {_load()}")
    median = {k: statistics.median(v) for k, v in rows.items()}
    print("\nmedian wall time of the per-scan stage (s):")
    for name, seconds in median.items():
        print(f"  {name:<22} {seconds:7.2f}   runs: {', '.join(f'{v:.2f}' for v in rows[name])}")
    ratios = [a / b for a, b in zip(rows["ray-1 warm"], rows["ray-2 warm"])]
    overhead = [(r - loc) / args.scans for r, loc in zip(rows["ray-1 warm"], rows["local"])]
    print(f"speed-up of 2 workers over 1 (warm, per rep): {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")
    print(f"Ray overhead per scan, ray-1 warm vs local (per rep): {', '.join(f'{o * 1000:.0f} ms' for o in overhead)}; "
          f"round trip of empty jobs: {median['ray-1 round trip per scan'] * 1000:.1f} ms (1 worker), "
          f"{median['ray-2 round trip per scan'] * 1000:.1f} ms (2 workers); "
          f"local compute per scan {median['local'] / args.scans:.2f} s")
    print(f"load average after: {_load()}")


def _round_trip(ray: object, subjects: list) -> float:
    """Seconds per scan for both phases' jobs that do nothing, submitted as `RayRunner` does."""
    from pipelines.distributed.per_scan import ScanOutcome

    def nothing(plan: object, subject: object, phase: str) -> ScanOutcome:
        return ScanOutcome(subject.id, str(subject.image), phase)

    task = ray.remote(nothing).options(num_cpus=1, max_retries=3, retry_exceptions=False)
    plan = ray.put({"size": "like a ScanPlan: small"})
    start = time.perf_counter()
    for phase in ("spatial", "tokens"):
        ray.get([task.remote(plan, subject, phase) for subject in subjects])
    return (time.perf_counter() - start) / len(subjects)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
