"""Seconds per volume of the weights-free classical tokenizer (`--backbone classical`) on the CPU.

Input: the phantom's procedural T2-like head at `--size`^3 (default 224, the paper's cube) with its
brain mask, so the filters see a brain-shaped volume, not noise. Each repeat tokenizes the same
volume; the report gives every repeat's wall time, the median, and the split between filtering
(Gaussian, gradient, Laplacian) and per-cube statistics, and the CPU time the process got (on a
shared machine the wall time is contention-bound). scipy's ndimage filters are single-threaded.

    python benchmarks/classical_tokens.py --size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from pipelines.phantom import procedural_head
from volumetric.classical_tokens import ClassicalTokenizer


def main() -> None:
    """Time `ClassicalTokenizer` on one procedural head and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="cube edge, a multiple of 14 (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    args = parser.parse_args()
    head = procedural_head(args.size)
    tokenizer = ClassicalTokenizer()
    walls, cpus = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        tokens = tokenizer(head.image, head.brain_mask)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    n = tokenizer.timing["inputs"]
    print(f"classical tokens of a {args.size}^3 procedural head, grid {tokens.grid}, "
          f"widths {[t.shape[-1] for t in tokens.layers]}, {int((~tokens.void).sum())} brain tokens; "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
    print("wall s per volume: " + ", ".join(f"{w:.2f}" for w in walls) + f" (median {statistics.median(walls):.2f})")
    # CPU seconds the process got: what the wall time would be on an otherwise idle core.
    print("CPU s per volume: " + ", ".join(f"{c:.2f}" for c in cpus) + f" (median {statistics.median(cpus):.2f})")
    print(f"of which filters {tokenizer.timing['filters_s'] / n:.2f} s, per-cube statistics "
          f"{tokenizer.timing['stats_s'] / n:.2f} s (means over the repeats)")


if __name__ == "__main__":
    main()
