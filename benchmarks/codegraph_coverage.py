"""CoDeGraph's coverage stop (Algorithm 1) on synthetic batches: false flags vs planted groups.

Per coverage value and batch shape, over `--seeds` seeds of `volumetric.engine.synthetic`:
- *noise* (no consistent pattern; 5 collections with random anomalies): share of batches in which
  any outlier community is flagged, and the mean excluded share of elements over all batches;
- *planted* (one pattern in 5 of the 30 collections, 3 elements each, spread 0.8: a faint group;
  with the noise batches' element counts and the default spread 0.15 it was found in every batch
  at either coverage; the 5 random-anomaly collections kept): share of batches whose outlier
  communities hold every planted collection.

The phantom cohorts that decide the default are in `codegraph_ablation.py` (row "coverage 0.95
(was)"); this is the check on the engine's own synthetic data, seconds per batch.

    python benchmarks/codegraph_coverage.py --coverage 0.95,1.0 --seeds 40 2>/dev/null
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm.auto import tqdm

from volumetric.engine import CoDeGraph, EngineOptions
from volumetric.engine.synthetic import synthetic_batch

QUIET = EngineOptions(device="cpu", progress=False)
SHAPES = ((48, 8), (64, 10), (96, 6), (96, 10))  # (elements per collection, random anomalies per collection)
PLANTED_PER_COLLECTION, PLANTED_SPREAD = 3, 0.8


def measure(coverage: float, m: int, per_collection: int, seeds: int) -> dict:
    """Noise and planted figures of one coverage value on one batch shape."""
    method = CoDeGraph(coverage=coverage)
    flagged, excluded, found = [], [], []
    for seed in range(seeds):
        noise = synthetic_batch(m=m, per_collection=per_collection, consistent=0, seed=seed)
        result = method(noise.features, options=QUIET)
        flagged.append(bool(result.outlier_communities))
        excluded.append(result.excluded_fraction)
        planted = synthetic_batch(m=m, per_collection=PLANTED_PER_COLLECTION, pattern_noise=PLANTED_SPREAD,
                                  consistent=5, seed=seed)
        result = method(planted.features, options=QUIET)
        members = {i for c in result.outlier_communities for i in result.communities[c]}
        found.append(set(planted.consistent) <= members)
    return {"noise_flagged": float(np.mean(flagged)), "noise_excluded": float(np.mean(excluded)),
            "planted_found": float(np.mean(found))}


def main(argv: list[str] | None = None) -> int:
    """Print one markdown row per (shape, coverage) and the mean over shapes per coverage."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coverage", default="0.95,1.0", help="comma-separated coverage values")
    parser.add_argument("--seeds", type=int, default=40, help="batches per shape and regime")
    args = parser.parse_args(argv)
    values = [float(v) for v in args.coverage.split(",")]
    print("| coverage | M | random anomalies per collection | noise: batches flagged % | noise: excluded % "
          "| planted: group flagged % |")
    print("|---|---|---|---|---|---|")
    totals = {v: [] for v in values}
    for m, per_collection in tqdm(SHAPES, desc="shapes"):
        for value in values:
            row = measure(value, m, per_collection, args.seeds)
            totals[value].append(row)
            print(f"| {value:g} | {m} | {per_collection} | {100 * row['noise_flagged']:.1f} | {100 * row['noise_excluded']:.2f} "
                  f"| {100 * row['planted_found']:.1f} |")
    for value, rows in totals.items():
        mean = {key: np.mean([r[key] for r in rows]) for key in rows[0]}
        print(f"| {value:g} | all | - | {100 * mean['noise_flagged']:.1f} | {100 * mean['noise_excluded']:.2f} "
              f"| {100 * mean['planted_found']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
