"""Peak memory of CoDeGraph against the batch size: it should grow with T * r_ref, not T * N.

Each size runs in a fresh process (so peaks do not mix) on random unit tokens, N collections of M
valid elements with C channels; `--views` LNAMD-like views of which `--graph-views` build the
graph. Printed per size: the process's peak resident memory (VmHWM), the part CoDeGraph keeps
(`ranked_bytes`: per graph view T x r_ref x (4 + 2 + 2) bytes, the (T, r_ref) ratio, T x k for
the others) and the input views themselves (N x M x C x 4 bytes each, the caller's), wall time.

`--dry`: the full path runs and allocates everything it would (views, lists, graph, filtering,
final pass), but each `ranked_minima` call computes only the pairs inside its first block of
collections; the other entries of the lists are filled with synthetic ascending distances and
random collections (at N = 300, M = 2,900 the full distance computation is hours of 2 CPU cores).
The graph then has no structure, so `--dry` also forces the exclusion stage on one community.

    python benchmarks/codegraph_memory.py --sizes 20,40,80 --m 500 --c 16
    python benchmarks/codegraph_memory.py --sizes 300 --m 2900 --c 384 --dry --block-mb 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def dry_ranked_minima(real):
    """`ranked_minima` computing one block of collections for real, the rest synthetic."""
    import torch

    from volumetric.engine.ranked import _block_collections

    def ranked(view, valid, rank, *, base=None, partners=None, nearest=False, options=None, grid=None):
        n, m = valid.shape
        first = _block_collections(n, m, options.block_mb)
        some = torch.zeros(n, n, dtype=torch.bool)
        some[:first, :first] = True
        some.fill_diagonal_(False)
        out = real(view, valid, rank, base=base, partners=some, nearest=nearest, options=options, grid=grid)
        g = torch.Generator().manual_seed(1)
        missing = torch.isinf(out.distances)
        rows = missing.nonzero()
        fill = 1.0 + torch.rand(len(rows), generator=g)
        out.distances[missing] = fill
        out.distances.copy_(out.distances.sort(1).values)  # in place, ascending again
        out.collections[missing] = torch.randint(n, (len(rows),), generator=g).to(out.collections.dtype)
        if out.nearest is not None:
            out.nearest[missing] = torch.randint(m, (len(rows),), generator=g).to(out.nearest.dtype)
        return out

    return ranked


def child(n: int, m: int, c: int, views: int, graph_views: int, precision: str, dry: bool, block_mb: float) -> dict:
    """Run CoDeGraph once in this process and report its peak memory."""
    import torch

    import volumetric.engine.codegraph as codegraph
    from volumetric.engine import CoDeGraph, EngineOptions
    from volumetric.engine.ranked import ranked_bytes

    if dry:
        codegraph.ranked_minima = dry_ranked_minima(codegraph.ranked_minima)
        # no structure in synthetic lists: filter one community anyway, as a batch with lesions would
        outliers = CoDeGraph._outliers
        CoDeGraph._outliers = lambda self, com, den: ([0], outliers(self, com, den)[1])

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    data = [torch.nn.functional.normalize(torch.randn(n, m, c, generator=g), dim=-1) for _ in range(views)]
    method = CoDeGraph()
    start = time.perf_counter()
    result = method(data, graph_views=list(range(graph_views)),
                    options=EngineOptions(device="cpu", precision=precision, block_mb=block_mb, progress=False))
    seconds = time.perf_counter() - start
    t, r_ref = n * m, result.reference_rank
    k = max(1, int(method.top_fraction * (n - 1)))
    kept = graph_views * ranked_bytes(t, n, m, r_ref, True) + t * r_ref * 12 + ranked_bytes(t, n, m, k, False)
    with open("/proc/self/status", encoding="ascii") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return {"n": n, "m": m, "c": c, "views": views, "graph_views": graph_views, "r_ref": r_ref,
            "peak_mib": peak_kib / 1024, "kept_mib": kept / 2**20, "inputs_mib": views * n * m * c * 4 / 2**20,
            "seconds": seconds, "excluded": result.excluded_fraction}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,100,300", help="comma-separated N")
    parser.add_argument("--m", type=int, default=2900, help="valid elements per collection")
    parser.add_argument("--c", type=int, default=384, help="channels")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--graph-views", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--block-mb", type=float, default=32.0, help="EngineOptions.block_mb")
    parser.add_argument("--dry", action="store_true", help="compute one block of collections, synthesise the rest")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.sizes), args.m, args.c, args.views, args.graph_views, args.precision, args.dry, args.block_mb)))
        return 0
    print(f"M={args.m} C={args.c} views={args.views} graph views={args.graph_views} precision={args.precision} "
          f"block_mb={args.block_mb:g}"
          f"{' DRY (one block of collections computed, the rest synthetic)' if args.dry else ''}")
    for n in [int(s) for s in args.sizes.split(",")]:
        command = [sys.executable, __file__, "--child", "--sizes", str(n), "--m", str(args.m), "--c", str(args.c),
                   "--views", str(args.views), "--graph-views", str(args.graph_views), "--precision", args.precision,
                   "--block-mb", str(args.block_mb), *(["--dry"] if args.dry else [])]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"N={n:5d} r_ref={row['r_ref']:4d}  peak {row['peak_mib']:8.0f} MiB  kept {row['kept_mib']:7.0f} MiB  "
              f"inputs {row['inputs_mib']:7.0f} MiB  {row['seconds']:7.1f} s  excluded {100 * row['excluded']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
