"""Grid x window on the small-metastasis phantom families: 14- vs 7-voxel classical
cubes, global search vs windows of w cells, MuSc and CoDeGraph.

Families, splits and seeds: `detection_families.py` (its "Small metastases" block): small-lesion
(1-5 look-alike lesions of radius 1.5-5 mm in a third of the scans), mixed (1.5-20 mm),
registration-error (small lesions, every scan misregistered by 2-8 mm), registration-error-mixed
(the mixed family's lesions, the same residual warps) and the split's look-alike
family (large lesions). Cohorts on the template grid, N4 before tokens, as the detection
families (the benchmark's path: the same tokenizer, standardisation and engine as `volscan
screen --backbone classical`, without preprocessing's registration). Per family and seed, for
every (grid, window) of `GRID_WINDOWS`: patient AUROC and lesion-scan Dice (paper protocol,
`codegraph_ablation.evaluate`). Rows cached in OUT/<split>/grid-window-<cube>.json; tables per
method written to OUT/<split>/grid-window-<method>-<cube>.md and printed.

    nice -n 10 python benchmarks/grid_window.py --out /tmp/fine/families --split dev --n 30 --cube 112
    nice -n 10 python benchmarks/grid_window.py --out /tmp/fine/families --split test --seeds 1 --families small-lesion
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
    parser.add_argument("--families", nargs="+", choices=FINE_FAMILIES, default=FINE_FAMILIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="a subset of the split's seeds (default all)")
    parser.add_argument("--n", type=int, default=30, help="scans per cohort (a third with lesions)")
    parser.add_argument("--cube", type=int, default=112, help="cube edge in voxels (multiple of 14)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seeds, families = args.seeds or SPLITS[args.split].seeds, args.families
    if not set(seeds) <= set(SPLITS[args.split].seeds):
        parser.error(f"split {args.split} has seeds {SPLITS[args.split].seeds}, got {seeds}")
    out = Path(args.out)
    store = out / args.split / f"grid-window-{args.cube}.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text(encoding="utf-8")) if store.is_file() else {}
    todo = [(f, s) for s in seeds for f in families if f"{f}:{s}:{args.n}" not in results]
    for family, seed in todo:  # each row saved as soon as it is measured: a stopped run continues
        results[f"{family}:{seed}:{args.n}"] = run_grid_window(family, args.split, seed, out, args.n, args.cube)
        store.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        log.warning("%s %s seed %d done", args.split, family, seed)
    for method in ("musc", "codegraph"):
        text = grid_window_table(results, method)
        (out / args.split / f"grid-window-{method}-{args.cube}.md").write_text(text + "\n", encoding="utf-8")
        print(f"\n{method}: patient AUROC / lesion Dice (%)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
