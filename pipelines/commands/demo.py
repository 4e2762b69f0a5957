"""`volscan demo`: generate a small phantom cohort and screen it, offline (see pipelines.demo)."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan demo`."""
    parser.add_argument("-o", "--out", default="volscan-demo", help="output folder (default ./volscan-demo)")
    parser.add_argument("--backbone", default=None,
                        help="features: 'classical' (default: weights-free intensity/texture statistics per cube) "
                             "or a timm ViT name (default ViT with --weights: vit_small_patch14_dinov2.lvd142m)")
    parser.add_argument("--vit", action="store_true",
                        help="use the ViT path (vit_small_patch14_dinov2.lvd142m; RANDOM weights unless --weights)")
    parser.add_argument("--weights", help="local ViT weights file (implies the ViT path)")
    parser.add_argument("--size", type=int, default=None, help="cube edge, a multiple of 14 (default 84)")
    parser.add_argument("--device", default="auto", help="'auto' (default), 'cpu' or 'cuda'")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a previous demo folder")


def run(args: argparse.Namespace) -> int:
    """Run the demo and end with where to look."""
    from dataclasses import replace

    from pipelines.demo import DEMO_BACKBONE, DEMO_COHORT, DEMO_CUBE, DEMO_VIT_BACKBONE, RANDOM_NOTICE, run_demo
    from pipelines.screen_config import CLASSICAL_BACKBONE

    vit = args.vit or args.weights is not None
    backbone = args.backbone or (DEMO_VIT_BACKBONE if vit else DEMO_BACKBONE)
    # A ViT without weights runs on random ones; the classical backbone refuses any --weights.
    weights = None if args.weights == "random" and backbone != CLASSICAL_BACKBONE else args.weights
    result = run_demo(args.out, backbone=backbone, weights=weights, cohort=replace(DEMO_COHORT, seed=args.seed),
                      size=args.size or DEMO_CUBE, device=args.device, force=args.force)
    report = result.screen.report
    metrics = result.screen.metrics or {}
    groups = result.cohort.groups
    print(f"phantom cohort: {result.cohort.root} ({len(result.cohort.subjects)} subjects; "
          f"groups in {result.cohort.root / 'cohort.json'})")
    print(f"features: {report['tokens']['features']}")
    print("most suspicious: " + ", ".join(f"{r.id} ({groups.get(r.id, '?')})" for r in result.screen.rows[:6]))
    if metrics.get("patient_auroc") is not None:
        print(f"patient AUROC {metrics['patient_auroc']:.3f} (healthy vs any lesion; 1 = every lesion scan ranked "
              "above every healthy one)")
    if report["tokens"]["random_weights"]:
        print("\n" + "!" * 78 + f"\n{RANDOM_NOTICE}\n" + "!" * 78)
    print(f"\nopen the report: {result.report_html}")
    return 0
