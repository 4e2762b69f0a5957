"""Benchmark: the engine against MuSc's own formulation (fp32 / bf16 / fp16), and CoDeGraph memory.

MuSc's formulation (its `models/modules/_MSM.py`, `compute_scores_fast`): for each image i ONE
`torch.cdist` of its M patches against all other images' patches concatenated ((N - 1) M
columns), reshaped to (M, N - 1, M), the per-image minimum, then the mean of the
k = int(f (N - 1)) smallest (f = 0.3). Void partner patches are masked (+inf) before the minimum
(the least change that gives MuSc a void mask; its query rows stay all M patches, as in MuSc).
The query rows of one image go through `cdist` in chunks of `--reference-rows` so that the
(rows, (N-1) M) matrix stays under ~1 GiB on this machine (same arithmetic).

Both sides run in one process on the same features, side by side, in `--repeats` rounds whose
order rotates (so load from other processes drifts into every side alike); the load average is
printed per round and the speed-ups are per round, then their median.

Sampled timing (default `--queries 4`): MuSc's formulation is timed on 4 query images (4 cdist
calls) and the engine on every pair of collections that touches one of them (each pair once),
plus the scoring; both are extrapolated linearly in the pairs they compute (MuSc: x N / 4;
engine: its once-per-batch setup, timed by a call with no pair, x 1, and the rest
x (N (N-1) / 2) / computed pairs), and scores are compared on those 4 collections.
`--queries 0` runs everything in full (MuSc: N cdist calls; engine: `mutual_scores`).

Reduced precision includes the fp32 recomputation of the highest-scoring elements
(`EngineOptions.exact_top`): when sampled, the query collections' highest elements are made
exact and further rows are recomputed against every partner, up to the most a full run refines
(ceil(RANK_MARGIN s T) + sum_j min(count_j, max(ceil(s count_j), PEAK_CANDIDATES)); a full run
refines the union of the two parts, at most that), in one fp32 pass as a full run does; that
step is timed once, not extrapolated.

Printed: seconds and valid elements/s per side, the speed-up in wall time and in this process's
CPU time (all threads; less sensitive to other processes on a shared machine), speed-up over MuSc (median of rounds), max relative
score difference to MuSc (fp32) and, for bf16 / fp16, max relative score error, top-1 % element
agreement against the fp32 engine; CoDeGraph's communities, exclusions and scores in reduced
precision against fp32 on the engine tests' synthetic batches; projected engine time for N = 150
and N = 1000 (pairs scale with N (N - 1)); CoDeGraph peak memory against N
(`benchmarks/codegraph_memory.py` per size, in a fresh process each) with a quadratic fit
projected to N = 1000.

    python benchmarks/engine.py --case all --repeats 3                 # CPU, both shapes
    python benchmarks/engine.py --case none --gemm                     # matrix-product kernels
    python benchmarks/engine.py --case none --codegraph-seeds 0,1,2,3  # bf16 vs fp32 in CoDeGraph
    python benchmarks/engine.py --case none --memory-sizes 50,150      # CoDeGraph memory only
    python benchmarks/engine.py --case none --windows 2 --precisions bf16  # position-aware scoring

`--windows w1,w2,..`: position-aware scoring (`EngineOptions.window`) side by side with the
global search, full `mutual_scores` runs (f = 0.3, refinement included) on random unit features
of N = 60 collections, C = 384, 30 % random void (the "3d" case's features at 16^3, the same
recipe at 32^3): sides "16^3 global", then "16^3 w" and "32^3 w" for each window w, in rotated
order per round; printed per round (wall and this process's CPU time) and as medians, with
the ratios to the 16^3 global side.
    bash benchmarks/engine_gpu.sh                                      # CUDA, <= 8 min on an H200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from volumetric.engine import CoDeGraph, EngineOptions, mutual_scores
from volumetric.engine.distances import collection_minima, element_minima
from volumetric.engine.gemm import rows_by_columns
from volumetric.engine.mutual import (
    PEAK_CANDIDATES,
    RANK_MARGIN,
    elements_to_refine,
    minima_scores,
    top_k_counts,
)
from volumetric.engine.synthetic import synthetic_batch

CASES = {
    "2d": dict(n=60, m=1369, c=1024, void=0.0),
    "3d": dict(n=60, m=4096, c=384, void=0.3),
}
PROJECT_TO = (150, 1000)
MUSC_FRACTION = 0.3
MEMORY_SCRIPT = Path(__file__).with_name("codegraph_memory.py")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    return timed_cpu(fn, device)[:2]


def timed_cpu(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Result, wall seconds and this process's CPU seconds (all threads) of one call."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start, time.process_time() - cpu


def musc_scores(features: torch.Tensor, valid: torch.Tensor, i: int, f: float, rows: int) -> torch.Tensor:
    """MuSc's `compute_scores_fast` for image i, void partners masked: (M,) scores (void rows too)."""
    n, m, c = features.shape
    others = torch.cat([features[:i], features[i + 1 :]]).reshape(-1, c)
    void_others = ~torch.cat([valid[:i], valid[i + 1 :]])  # (N-1, M)
    any_void = bool(void_others.any())
    k = max(1, int((n - 1) * f))  # MuSc's int(f (N-1)), which is 0 (a NaN mean) below N = 5
    out = []
    for r0 in range(0, m, rows):
        d = torch.cdist(features[i, r0 : r0 + rows], others).view(-1, n - 1, m)
        if any_void:  # MuSc has no mask: without void, no extra pass over d
            d.masked_fill_(void_others, torch.inf)
        per_image = torch.min(d, -1)[0]
        out.append(torch.topk(per_image, k, largest=False, sorted=True)[0].mean(1))
    return torch.cat(out)


def query_partners(n: int, queries: list[int]) -> torch.Tensor:
    """(N, N) pairs touching a query collection (symmetric, no diagonal)."""
    partners = torch.zeros(n, n, dtype=torch.bool)
    partners[queries] = True
    partners[:, queries] = True
    partners.fill_diagonal_(False)
    return partners


def agreement_top(reference: torch.Tensor, other: torch.Tensor, share: float = 0.01) -> float:
    """Fraction of the top `share` elements by `reference` that are also top by `other`."""
    count = max(1, round(share * reference.numel()))
    top_ref = set(reference.topk(count).indices.tolist())
    top_other = set(other.topk(count).indices.tolist())
    return len(top_ref & top_other) / count


def max_relative(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((values.double() - reference.double()).abs() / reference.double().abs()).max())


def run_case(name: str, args: argparse.Namespace, device: torch.device) -> None:
    spec = dict(CASES[name])
    if args.collections:
        spec["n"] = args.collections
    n, m, c = spec["n"], spec["m"], spec["c"]
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(n, m, c, generator=g), dim=-1)
    valid = torch.rand(n, m, generator=g) >= spec["void"]
    valid[torch.arange(n), 0] = True
    elements = int(valid.sum())
    features_dev, valid_dev = features.to(device), valid.to(device)
    full = args.queries == 0
    queries = list(range(n)) if full else [round(q * n / args.queries) for q in range(args.queries)]
    partners = None if full else query_partners(n, queries)
    total_pairs = n * (n - 1) // 2
    engine_pairs = total_pairs if full else int(torch.triu(partners, 1).sum())
    ref_scale, engine_scale = n / len(queries), total_pairs / engine_pairs
    k = top_k_counts(torch.tensor([n]), MUSC_FRACTION)

    def reference() -> tuple[torch.Tensor, float, float]:
        out, wall, cpu = timed_cpu(lambda: torch.cat([
            musc_scores(features_dev, valid_dev, i, MUSC_FRACTION, args.reference_rows)[valid_dev[i]] for i in queries
        ]).cpu(), device)
        return out, wall * ref_scale, cpu * ref_scale

    def engine(precision: str) -> Callable[[], tuple[torch.Tensor, float, float]]:
        options = EngineOptions(device=str(device), precision=precision, block_mb=args.block_mb,
                                exact_top=args.exact_top, progress=False)
        if full:
            return lambda: timed_cpu(lambda: mutual_scores(features_dev, MUSC_FRACTION, valid, options=options)[valid],
                                     device)

        def sampled() -> tuple[torch.Tensor, float, float]:
            """Only the pairs that touch a query (their work beyond the setup, measured by a call with
            no pair, x engine_scale), then the queries' scores. Reduced
            precision: the queries' highest elements made exact, plus as many other rows as a full run
            refines at most, each against every partner, timed x 1."""
            no_pairs = torch.zeros(n, n, dtype=torch.bool)
            _, setup_wall, setup_cpu = timed_cpu(
                lambda: collection_minima([features_dev], valid, partners=no_pairs, options=options), device)
            minima, wall, cpu = timed_cpu(
                lambda: collection_minima([features_dev], valid, partners=partners, options=options), device)
            # the per-batch setup (operands of all T tokens) happens once in a full run: only the
            # pair work beyond it is extrapolated
            wall = setup_wall + max(0.0, wall - setup_wall) * engine_scale
            cpu = setup_cpu + max(0.0, cpu - setup_cpu) * engine_scale
            if precision != "fp32" and args.exact_top > 0:
                among = torch.isin(minima.owner, torch.tensor(queries))
                bound = math.ceil(RANK_MARGIN * args.exact_top * elements) + sum(
                    min(count, max(math.ceil(args.exact_top * count), PEAK_CANDIDATES)) for count in valid.sum(1).tolist())

                def refine() -> None:
                    """One fp32 pass, as in a full run: the queries' chosen elements (written back) and
                    filler rows of other collections up to the bound, every row against every partner
                    (a query's partners are all collections)."""
                    chosen = elements_to_refine(minima, k.expand(n), args.exact_top, among)
                    filler = torch.nonzero(~among).flatten()[: max(0, bound - len(chosen))]
                    exact = element_minima([features_dev], valid, torch.cat([chosen, filler]), options=options)
                    minima.distances[chosen] = exact[: len(chosen)]

                _, refine_wall, refine_cpu = timed_cpu(refine, device)
                wall, cpu = wall + refine_wall, cpu + refine_cpu
            return minima_scores(minima, k.expand(n))[queries][valid[queries]], wall, cpu

        return sampled

    sides: dict[str, Callable[[], tuple[torch.Tensor, float, float]]] = {"musc": reference}
    sides.update({p: engine(p) for p in args.precisions})
    order = list(sides)
    seconds: dict[str, list[float]] = {s: [] for s in order}
    cpu_seconds: dict[str, list[float]] = {s: [] for s in order}
    results: dict[str, torch.Tensor] = {}
    print(f"\n[{name}] N={n} M={m} C={c} void={spec['void']:.0%} valid elements={elements} device={device} "
          f"threads={torch.get_num_threads()} block_mb={args.block_mb} "
          + ("full run" if full else f"timed on {len(queries)} query collections {queries}, extrapolated: "
             f"MuSc x{ref_scale:.1f}, engine x{engine_scale:.1f} ({engine_pairs} of {total_pairs} pairs)"), flush=True)
    for round_ in range(args.repeats):
        load = os.getloadavg()[0]
        rotated = order[round_ % len(order):] + order[: round_ % len(order)]
        for side in rotated:
            out, s, cpu = sides[side]()
            seconds[side].append(s)
            cpu_seconds[side].append(cpu)
            results.setdefault(side, out.float().cpu())
        line = "  ".join(f"{s} {seconds[s][-1]:8.1f} s" for s in order)
        ratios = "  ".join(f"{p} {seconds['musc'][-1] / seconds[p][-1]:6.2f}x" for p in args.precisions)
        print(f"  round {round_ + 1}: load {load:5.1f} -> {os.getloadavg()[0]:5.1f}   {line}   speed-up {ratios}",
              flush=True)

    musc = results["musc"]
    print(f"  {'side':5s} {'median s':>10s} {'elements/s':>12s} {'speed-up (median, min-max)':>30s}  accuracy")
    for side in order:
        med = statistics.median(seconds[side])
        text = f"  {side:5s} {med:10.1f} {elements / med:12,.0f}"
        if side == "musc":
            print(text + f"  {'1.00x':>30s}  (reference)")
            continue
        per_round = [a / b for a, b in zip(seconds["musc"], seconds[side])]
        text += f"  {statistics.median(per_round):12.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        per_round_cpu = [a / b for a, b in zip(cpu_seconds["musc"], cpu_seconds[side])]
        text += f"  CPU-time {statistics.median(per_round_cpu):.2f}x"
        text += f"  max rel. diff to MuSc {max_relative(results[side], musc):.2e}"
        if side != "fp32" and "fp32" in results:
            text += (f"; vs fp32: max rel. error {max_relative(results[side], results['fp32']):.2e}, "
                     f"top-1 % agreement {agreement_top(results['fp32'], results[side]):.3f}")
        print(text)
    for side in args.precisions:
        med = statistics.median(seconds[side])
        projected = ", ".join(f"N={p}: {med * p * (p - 1) / (n * (n - 1)):,.0f} s" for p in PROJECT_TO)
        print(f"  {side} projected (pairs ~ N^2, same M): {projected}")


def gemm_section(args: argparse.Namespace) -> None:
    """GFLOP/s of the products behind a block: torch.mm (MKL for float32 on CPU) against the kernel
    `volumetric.engine.gemm` picks, at the engine's block shapes, widths as built (C + 2 / C + 4)
    and padded to 32; every round runs every shape and kernel in turn (best of 3 calls), and the
    median over `--repeats` rounds is printed."""
    if not args.gemm:
        return
    shapes = [("2d", 8192, 1369, 1026), ("2d", 8192, 1369, 1056), ("3d", 8192, 2867, 386), ("3d", 8192, 2867, 416)]
    print(f"\n[matrix products] (P, W) @ (R, W).T, threads={torch.get_num_threads()}, {args.repeats} rounds", flush=True)
    g = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    calls: dict[tuple, Callable[[], torch.Tensor]] = {}
    for case, p, r, w in shapes:
        a32, b32 = torch.randn(p, w, generator=g), torch.randn(r, w, generator=g)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        buffer32, buffer16 = torch.empty(p * r), torch.empty(p * r, dtype=torch.bfloat16)
        calls[(case, p, r, w, "fp32 torch.mm")] = lambda a=a32, b=b32, o=buffer32: torch.mm(a, b.T, out=o.view(len(a), len(b)))
        calls[(case, p, r, w, "fp32 engine")] = lambda a=a32, b=b32, o=buffer32: rows_by_columns(a, b, o)
        calls[(case, p, r, w, "bf16 engine")] = lambda a=a16, b=b16, o=buffer16: rows_by_columns(a, b, o)
    rates: dict[tuple, list[float]] = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, fn in calls.items():
            fn()
            best = min(timed(fn, cpu)[1] for _ in range(3))
            rates[key].append(2 * key[1] * key[2] * key[3] / best / 1e9)
    for case, p, r, w in shapes:
        text = "  ".join(f"{key[4]} {statistics.median(v):5.0f}" for key, v in rates.items() if key[:4] == (case, p, r, w))
        print(f"  {case} P={p} R={r} W={w}: GFLOP/s {text}", flush=True)


def codegraph_section(args: argparse.Namespace, device: torch.device) -> None:
    """Reduced precision against fp32 on the engine tests' synthetic CoDeGraph batches."""
    seeds = [int(s) for s in args.codegraph_seeds.split(",") if s]
    reduced = [p for p in args.precisions if p != "fp32"]
    if not seeds or not reduced:
        return
    print(f"\n[CoDeGraph, reduced precision] synthetic_batch(m=96, per_collection=10, seed) as in "
          f"tests/test_engine_codegraph.py, device={device}", flush=True)
    for seed in seeds:
        batch = synthetic_batch(m=96, per_collection=10, seed=seed)
        runs = {p: CoDeGraph()(batch.features, options=EngineOptions(device=str(device), precision=p, progress=False))
                for p in ["fp32", *reduced]}
        exact = runs["fp32"]
        for p in reduced:
            other = runs[p]
            flagged = [[r.communities[c] for c in r.outlier_communities] for r in (exact, other)]
            print(f"  seed {seed} {p}: all communities equal {other.communities == exact.communities}, "
                  f"outlier communities equal {flagged[0] == flagged[1]} {flagged[0]}, "
                  f"excluded agree {float((other.excluded == exact.excluded).float().mean()):.4f}, "
                  f"max rel. score error {max_relative(other.scores.flatten(), exact.scores.flatten()):.2e}, "
                  f"top-1 % agreement {agreement_top(exact.scores.flatten(), other.scores.flatten()):.3f}", flush=True)


def memory_section(args: argparse.Namespace) -> None:
    """CoDeGraph peak memory against N, one fresh process per size (benchmarks/codegraph_memory.py)."""
    sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    if not sizes:
        return
    print(f"\n[CoDeGraph memory] M={args.memory_m} valid tokens, C={args.memory_c}, views={args.memory_views}, "
          f"precision={args.memory_precision} (peak = process VmHWM incl. the input views)", flush=True)
    rows = []
    for n in sizes:
        command = [sys.executable, str(MEMORY_SCRIPT), "--child", "--sizes", str(n), "--m", str(args.memory_m),
                   "--c", str(args.memory_c), "--views", str(args.memory_views), "--graph-views", "1",
                   "--precision", args.memory_precision]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.splitlines()[-1])
        rows.append(row)
        print(f"  N={n:5d}  peak {row['peak_mib']:8.0f} MiB  (inputs {row['inputs_mib']:6.0f} MiB, "
              f"kept lists {row['kept_mib']:6.0f} MiB)  {row['seconds']:7.1f} s", flush=True)
    if len(rows) >= 2:
        ns = torch.tensor([float(r["n"]) for r in rows], dtype=torch.float64)
        peaks = torch.tensor([r["peak_mib"] for r in rows], dtype=torch.float64)
        basis = [torch.ones_like(ns), ns, ns**2][: min(3, len(rows))]
        if len(rows) == 2:
            basis = [torch.ones_like(ns), ns**2]
        coef = torch.linalg.lstsq(torch.stack(basis, 1), peaks[:, None]).solution.flatten()
        for target in sorted({300, 1000} - set(int(r["n"]) for r in rows)):
            x = [1.0, float(target), float(target) ** 2] if len(rows) >= 3 else [1.0, float(target) ** 2]
            value = float(torch.tensor(x, dtype=torch.float64) @ coef)
            print(f"  N={target:5d}  peak {value:8.0f} MiB  (projected: fit over {[r['n'] for r in rows]})")


def window_section(args: argparse.Namespace, device: torch.device) -> None:
    """Global 16^3 against windowed 16^3 and 32^3 (full runs, medians of rounds)."""
    windows = [int(w) for w in args.windows.split(",") if w]
    if not windows:
        return
    n, c, void = args.collections or 60, CASES["3d"]["c"], CASES["3d"]["void"]
    sides: dict[str, tuple[int, int | None]] = {"16^3 global": (16, None)}
    for w in windows:
        sides[f"16^3 w={w}"] = (16, w)
        sides[f"32^3 w={w}"] = (32, w)
    batches = {}
    for edge in sorted({edge for edge, _ in sides.values()}):
        g = torch.Generator().manual_seed(0)
        m = edge**3
        features = torch.nn.functional.normalize(torch.randn(n, m, c, generator=g), dim=-1)
        valid = torch.rand(n, m, generator=g) >= void
        valid[torch.arange(n), 0] = True
        batches[edge] = (features, valid)
    for precision in args.precisions:
        print(f"\n[window] N={n} C={c} void={void:.0%} precision={precision} device={device} "
              f"threads={torch.get_num_threads()} full mutual_scores runs, f={MUSC_FRACTION}", flush=True)
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        cpu_seconds: dict[str, list[float]] = {side: [] for side in sides}
        order = list(sides)
        for round_ in range(args.repeats):
            load = os.getloadavg()[0]
            for side in order[round_ % len(order):] + order[: round_ % len(order)]:
                edge, w = sides[side]
                features, valid = batches[edge]
                options = EngineOptions(device=str(device), precision=precision, block_mb=args.block_mb,
                                        exact_top=args.exact_top, progress=False, window=w)
                _, wall, cpu = timed_cpu(lambda: mutual_scores(features, MUSC_FRACTION, valid, options=options,
                                                               grid=(edge,) * 3), device)
                seconds[side].append(wall)
                cpu_seconds[side].append(cpu)
            print(f"  round {round_ + 1}: load {load:5.1f} -> {os.getloadavg()[0]:5.1f}   "
                  + "  ".join(f"{side} {seconds[side][-1]:7.1f} s (CPU {cpu_seconds[side][-1]:7.1f} s)"
                              for side in order), flush=True)
        for side in order:
            ratios = [b / s for b, s in zip(seconds["16^3 global"], seconds[side])]
            cpu_ratios = [b / s for b, s in zip(cpu_seconds["16^3 global"], cpu_seconds[side])]
            print(f"  {side:12s} median {statistics.median(seconds[side]):7.1f} s, CPU "
                  f"{statistics.median(cpu_seconds[side]):7.1f} s   16^3 global / side: wall median "
                  f"{statistics.median(ratios):5.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), CPU-time median "
                  f"{statistics.median(cpu_ratios):5.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all", "none"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16; "
                        "plus fp16 on CUDA)")
    parser.add_argument("--block-mb", type=float, default=EngineOptions().block_mb)
    parser.add_argument("--exact-top", type=float, default=EngineOptions().exact_top, help="EngineOptions.exact_top")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=4, help="query collections timed (0 = full runs)")
    parser.add_argument("--collections", type=int, default=0, help="override N of the cases")
    parser.add_argument("--reference-rows", type=int, default=1024, help="MuSc query rows per cdist chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gemm", action="store_true", help="GFLOP/s of torch.mm vs the engine's kernels (CPU)")
    parser.add_argument("--codegraph-seeds", default="", help="CoDeGraph fp32 vs reduced precision on "
                        "synthetic batches with these seeds (e.g. 0,1,2,3)")
    parser.add_argument("--memory-sizes", default="", help="CoDeGraph memory: comma list of N (e.g. 50,150,300)")
    parser.add_argument("--memory-m", type=int, default=2900)
    parser.add_argument("--memory-c", type=int, default=384)
    parser.add_argument("--memory-views", type=int, default=2)
    parser.add_argument("--memory-precision", default="fp32")
    parser.add_argument("--windows", default="", help="position-aware scoring: comma list of windows w (cells), "
                        "16^3 and 32^3 windowed against 16^3 global")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default = "fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16"
    args.precisions = (args.precisions or default).split(",")
    if args.case != "none":
        for name in CASES if args.case == "all" else [args.case]:
            run_case(name, args, device)
    gemm_section(args)
    codegraph_section(args, device)
    memory_section(args)
    window_section(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
