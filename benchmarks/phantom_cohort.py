"""CoDeGraph vs MuSc on a phantom cohort with a consistent-lesion group (a benchmark, not a test).

Generates a cohort (default 40 healthy, 10 random-lesion, 8 sharing one lesion pattern at one
place), screens it with each method through `pipelines.screen.run_screen` (one shared cache,
so the second method reuses preprocessing and tokens), and prints side by side: patient AUROC,
F1-max, voxel AUROC, Dice, AUROC of each lesion group against the healthy group alone, the
ranks of the consistent group, CoDeGraph's outlier communities (with the groups of their
members) and the wall time per stage.

Offline there are no pretrained DINOv2 weights, so the backbone is a ViT-S/14-shaped DINOv2
model with RANDOM weights (an honest stand-in: random patch embeddings still act as a random
projection of local intensity patterns; the numbers measure the pipeline and the scoring, not
DINOv2). Pass `--weights PATH` for a real checkpoint.

    python benchmarks/phantom_cohort.py --out /tmp/volscan-bench --depth 4   # ~10 min on 2 shared cores
    python benchmarks/phantom_cohort.py --out /tmp/b --normal 20 --lesion 5 --consistent 4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipelines.run_folder import atomic_write_text
from pipelines.phantom import LesionSettings, PhantomConfig, generate_cohort
from pipelines.reproduce import screen_metrics
from pipelines.screen import run_screen
from pipelines.screen_config import ScreenConfig
from volumetric.metrics import auroc


def group_auroc(scores: dict[str, float], groups: dict[str, str], group: str) -> float | None:
    """AUROC of `group` against the healthy subjects only (None if either is empty)."""
    ids = [s for s in scores if groups[s] in (group, "normal")]
    labels = np.array([groups[s] == group for s in ids])
    if labels.all() or not labels.any():
        return None
    return auroc(np.array([scores[s] for s in ids]), labels)


def summarise(report: dict, groups: dict[str, str]) -> dict:
    """Metrics of one screen run, plus per-group AUROCs, consistent-group ranks and communities."""
    scores = {s["id"]: s["score"] for s in report["subjects"]}
    ranks = {s["id"]: s["rank"] for s in report["subjects"]}
    summary = screen_metrics(report)
    summary["auroc_consistent_vs_normal"] = group_auroc(scores, groups, "consistent")
    summary["auroc_lesion_vs_normal"] = group_auroc(scores, groups, "lesion")
    summary["consistent_ranks"] = sorted(ranks[s] for s in groups if groups[s] == "consistent")
    summary["excluded_fraction"] = report.get("excluded_fraction")
    codegraph = report.get("codegraph") or {}
    summary["outlier_communities"] = [
        {"size": len(members), "groups": {g: sum(groups[m] == g for m in members) for g in ("normal", "lesion", "consistent")}}
        for members in codegraph.get("outlier_communities") or []
    ]
    summary["n_communities"] = len(codegraph.get("communities") or [])
    summary["timings_s"] = report.get("timings_s")
    return summary


def fmt(value: object) -> str:
    """Percent with one decimal for fractions, as-is otherwise."""
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return "n/a" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder (cohort/, codegraph/, musc/, cache/, benchmark.json)")
    parser.add_argument("--normal", type=int, default=40)
    parser.add_argument("--lesion", type=int, default=10)
    parser.add_argument("--consistent", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phantom-size", type=int, default=64, help="phantom template grid (voxels over 200 mm)")
    parser.add_argument("--lesion-radius", type=float, nargs=2, default=(10.0, 18.0), metavar=("MIN", "MAX"),
                        help="outer lesion radius range in mm (default 10 18: about one token at cube 56)")
    parser.add_argument("--template", default="procedural", help="phantom anatomy: procedural, auto or a folder")
    parser.add_argument("--size", type=int, default=56, help="cube edge (multiple of 14)")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--depth", type=int, default=None, help="build a shallower random model (timm depth=)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    start = time.perf_counter()
    cohort = generate_cohort(out / "cohort", PhantomConfig(n_normal=args.normal, n_lesion=args.lesion,
                                                           n_consistent=args.consistent, seed=args.seed,
                                                           size=args.phantom_size, template=args.template,
                                                           lesions=LesionSettings(radius_mm=tuple(args.lesion_radius))),
                             force=args.force)
    phantom_s = time.perf_counter() - start
    base = ScreenConfig(backbone=args.backbone, weights=args.weights, size=args.size, device=args.device,
                        template=str(cohort.template_dir), cache=str(out / "cache"),
                        backbone_kwargs={} if args.depth is None else {"depth": args.depth})
    results = {}
    for method in ("codegraph", "musc"):
        run = run_screen(cohort.images_dir, out / method, replace(base, method=method),
                         labels_dir=cohort.labels_dir, force=args.force)
        results[method] = summarise(run.report, cohort.groups)

    rows = [("patient AUROC", "patient_auroc"), ("patient F1-max", "f1_max"), ("voxel AUROC", "voxel_auroc"),
            ("voxel AUROC (brain only)", "voxel_auroc_brain"), ("Dice (all scans)", "dice"),
            ("Dice (lesion scans)", "dice_mean_lesion"), ("AUROC consistent vs healthy", "auroc_consistent_vs_normal"),
            ("AUROC random-lesion vs healthy", "auroc_lesion_vs_normal"), ("consistent-group ranks", "consistent_ranks"),
            ("excluded elements", "excluded_fraction")]
    print(f"\ncohort: {args.normal} healthy / {args.lesion} random-lesion / {args.consistent} consistent, seed "
          f"{args.seed}, phantom {args.phantom_size}^3 ({cohort.info['anatomy']}); cube {args.size}, "
          f"{args.backbone} weights={args.weights}")
    print("\n| metric (%) | CoDeGraph | MuSc |\n|---|---|---|")
    for title, key in rows:
        print(f"| {title} | {fmt(results['codegraph'].get(key))} | {fmt(results['musc'].get(key))} |")
    print(f"\nCoDeGraph: {results['codegraph']['n_communities']} communities; outlier communities: "
          f"{results['codegraph']['outlier_communities'] or 'none'}")
    print(f"wall time (s): phantom {phantom_s:.1f}; "
          + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.1f}" for k, v in (r["timings_s"] or {}).items())
                      for m, r in results.items()))
    payload = {"args": vars(args), "phantom_s": round(phantom_s, 2), "results": results}
    atomic_write_text(out / "benchmark.json", json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
