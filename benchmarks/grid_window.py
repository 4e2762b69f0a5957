"""Grid x window on the small-metastasis phantom families (issue 25): 14- vs 7-voxel classical
cubes, global search vs windows of w cells, MuSc and CoDeGraph.

Families, splits and seeds: `detection_families.py` (its "Small metastases" block): small-lesion
(1-5 look-alike lesions of radius 1.5-5 mm in a third of the scans), mixed (1.5-20 mm),
registration-error (small lesions, every scan misregistered by 2-8 mm) and the split's look-alike
family (large lesions). Cohorts on the template grid, N4 before tokens, as the detection
families (the benchmark's path: the same tokenizer, standardisation and engine as `volscan
screen --backbone classical`, without preprocessing's registration). Per family and seed, for
every (grid, window) of `GRID_WINDOWS`: patient AUROC and lesion-scan Dice (paper protocol,
`codegraph_ablation.evaluate`). Rows cached in OUT/<split>/grid-window-<cube>.json; tables per
method written to OUT/<split>/grid-window-<method>-<cube>.md and printed.

    nice -n 10 python benchmarks/grid_window.py --out /tmp/fine/families --split dev --n 30 --cube 112
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from detection_families import FINE_FAMILIES, SPLITS, grid_window_table, run_grid_window

log = logging.getLogger("grid_window")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder (cohorts, tokens, <split>/grid-window-*.json/md)")
    parser.add_argument("--split", choices=tuple(SPLITS), required=True)
    parser.add_argument("--families", default=",".join(FINE_FAMILIES), help="comma-separated subset")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the split's seeds")
    parser.add_argument("--n", type=int, default=30, help="scans per cohort (a third with lesions)")
    parser.add_argument("--cube", type=int, default=112, help="cube edge in voxels (multiple of 14)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(SPLITS[args.split].seeds)
    if not set(seeds) <= set(SPLITS[args.split].seeds):
        parser.error(f"split {args.split} has seeds {SPLITS[args.split].seeds}, got {seeds}")
    families = args.families.split(",")
    for family in families:
        if family not in FINE_FAMILIES:
            parser.error(f"unknown family {family!r}; expected {FINE_FAMILIES}")
    out = Path(args.out)
    store = out / args.split / f"grid-window-{args.cube}.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text(encoding="utf-8")) if store.is_file() else {}
    for seed in seeds:
        for family in families:
            key = f"{family}:{seed}:{args.n}"
            if key not in results:
                results[key] = run_grid_window(family, args.split, seed, out, args.n, args.cube)
                store.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
                log.warning("%s %s done", args.split, key)
    for method in ("musc", "codegraph"):
        text = grid_window_table(results, method)
        (out / args.split / f"grid-window-{method}-{args.cube}.md").write_text(text + "\n", encoding="utf-8")
        print(f"\n{method}: patient AUROC / lesion Dice (%)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
