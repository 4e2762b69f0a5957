"""Benchmark: `mutual_scores` against the straightforward per-collection `torch.cdist` loop.

Prints, in one run, elements/s of both on the same features, peak extra memory (RSS on CPU,
allocator peak on CUDA), the speed ratio, the largest relative score difference, and the
projected time of the paper's N = 150 cohort (both scale with N^2 at fixed M).

Cases: 2D-like N = 60, M = 1369 (37 x 37 patches), C = 1024; 3D-like N = 60, M = 4096 (16^3)
with 30 % void, C = 192. The reference is the obvious formulation: for each collection I and
each J != I, `torch.cdist(F_I, F_J).amin(1)` on the valid tokens, then sort and average the k
smallest. It needs N (N - 1) cdist calls; to keep the run short it is timed on
`--reference-collections` query collections (against all others; half before and half after
the engine) and extrapolated linearly to N, which the output says.

    python benchmarks/engine.py                 # both cases, CPU (all threads torch uses)
    python benchmarks/engine.py --case 3d --device cuda --half
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import torch

from volumetric.engine import mutual_scores

CASES = {
    "2d": dict(n=60, m=1369, c=1024, void=0.0),
    "3d": dict(n=60, m=4096, c=192, void=0.3),
}
COHORT = 150
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * PAGE


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, int]:
    """Run fn once; return its result, wall seconds and peak extra memory in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    base = peak = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return out, seconds, max(peak, rss_bytes()) - base


def reference_scores(features: torch.Tensor, valid: torch.Tensor, queries: list[int], f: float) -> torch.Tensor:
    """The straightforward formulation: for each query collection, cdist to every other one."""
    n = features.shape[0]
    k = max(1, int(f * (n - 1)))
    banks = [features[j][valid[j]] for j in range(n)]
    out = []
    for i in queries:
        minima = torch.stack([torch.cdist(banks[i], banks[j]).amin(1) for j in range(n) if j != i], 1)
        out.append(minima.sort(1).values[:, :k].mean(1))
    return torch.cat(out)


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> None:
    spec = CASES[name]
    n, m, c = spec["n"], spec["m"], spec["c"]
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(n, m, c, generator=g), dim=-1)
    valid = torch.rand(n, m, generator=g) >= spec["void"]
    elements = int(valid.sum())
    features_dev, valid_dev = features.to(device), valid.to(device)

    queries = list(range(min(n, args.reference_collections)))
    half_way = len(queries) // 2

    def reference(part: list[int]) -> tuple[torch.Tensor, float, int]:
        return measure(lambda: reference_scores(features_dev, valid_dev, part, args.top_fraction).cpu(), device)

    # The reference is timed half before and half after the engine, so that load from other
    # processes on a shared machine drifts into both sides of the ratio alike.
    first, first_s, first_mem = reference(queries[:half_way])
    scores, engine_s, engine_mem = measure(
        lambda: mutual_scores(
            features_dev, args.top_fraction, valid, device=device, half=args.half,
            block_mb=args.block_mb, progress=False,
        ),
        device,
    )
    second, second_s, second_mem = reference(queries[half_way:])
    reference_values = torch.cat([first, second])
    ref_s, ref_mem = first_s + second_s, max(first_mem, second_mem)
    ref_full_s = ref_s * n / len(queries)
    ours = scores[queries][valid[queries]].double()
    diff = float(((ours - reference_values.double()).abs() / reference_values.double().abs()).max())
    scale = (COHORT / n) ** 2
    print(f"\n[{name}] N={n} M={m} C={c} void={spec['void']:.0%} valid elements={elements} device={device}"
          f"{' half' if args.half else ''} threads={torch.get_num_threads()}")
    print(f"  engine    : {engine_s:8.2f} s  {elements / engine_s:12,.0f} elements/s  peak +{engine_mem / 2**20:7.0f} MiB")
    print(f"  reference : {ref_full_s:8.2f} s  {elements / ref_full_s:12,.0f} elements/s  peak +{ref_mem / 2**20:7.0f} MiB"
          f"  (timed {ref_s:.2f} s on {len(queries)}/{n} query collections, extrapolated x{n / len(queries):.1f})")
    print(f"  speed-up  : {ref_full_s / engine_s:8.2f} x   max relative score difference {diff:.2e}")
    print(f"  N={COHORT} projection (x{scale:.2f}): engine {engine_s * scale:8.1f} s, reference {ref_full_s * scale:8.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--half", action="store_true", help="float16 products (CUDA only)")
    parser.add_argument("--block-mb", type=float, default=256.0)
    parser.add_argument("--top-fraction", type=float, default=0.1)
    parser.add_argument("--reference-collections", type=int, default=6,
                        help="query collections the reference is timed on (then extrapolated to N)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in CASES if args.case == "all" else [args.case]:
        run_case(name, args, device)


if __name__ == "__main__":
    main()
