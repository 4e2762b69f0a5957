"""`volscan demo`: generate a small phantom cohort and screen it, offline (see pipelines.demo)."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan demo`."""
    parser.add_argument("-o", "--out", default="volscan-demo", help="output folder (default ./volscan-demo)")
    parser.add_argument("--weights", help="local backbone weights file (default: random weights, pipeline demo only)")
    parser.add_argument("--backbone", default=None,
                        help="timm backbone matching --weights (default vit_small_patch14_dinov2.lvd142m)")
    parser.add_argument("--size", type=int, default=None, help="cube edge, a multiple of 14 (default 56)")
    parser.add_argument("--device", default="auto", help="'auto' (default), 'cpu' or 'cuda'")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a previous demo folder")


def run(args: argparse.Namespace) -> int:
    """Run the demo and end with where to look."""
    from dataclasses import replace

    from pipelines.demo import DEMO_BACKBONE, DEMO_COHORT, DEMO_CUBE, RANDOM_NOTICE, run_demo

    if args.weights == "random":
        args.weights = None
    result = run_demo(args.out, weights=args.weights, backbone=args.backbone or DEMO_BACKBONE,
                      cohort=replace(DEMO_COHORT, seed=args.seed), size=args.size or DEMO_CUBE,
                      device=args.device, force=args.force)
    metrics = result.screen.metrics or {}
    top = result.screen.rows[:5]
    print(f"phantom cohort: {result.cohort.root} ({len(result.cohort.subjects)} subjects; "
          f"groups in {result.cohort.root / 'cohort.json'})")
    print("most suspicious: " + ", ".join(f"{r.id} ({result.cohort.groups.get(r.id, '?')})" for r in top))
    if metrics.get("patient_auroc") is not None:
        print(f"patient AUROC {metrics['patient_auroc']:.3f} (healthy vs any lesion)")
    if args.weights is None:
        print("\n" + "!" * 78 + f"\n{RANDOM_NOTICE}\n" + "!" * 78)
    print(f"\nopen the report: {result.report_html}")
    return 0
