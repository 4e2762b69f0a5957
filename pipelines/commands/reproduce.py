"""`volscan reproduce brats-mets-ixi`: the published BraTS-METS vs IXI experiment (see pipelines.reproduce)."""

from __future__ import annotations

import argparse

from pipelines.choices import METHODS, listed

EXPERIMENTS = ("brats-mets-ixi",)


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan reproduce`."""
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which published experiment")
    parser.add_argument("--brats", required=True, help="BraTS-METS 2025 folder (case folders BraTS-MET-xxxxx-yyy/)")
    parser.add_argument("--ixi", required=True, help="IXI T2 folder (IXIxxx-<Site>-xxxx-T2.nii.gz files)")
    parser.add_argument("-o", "--out", required=True, help="output folder (table.md, table.json, selection.json, "
                                                           "one screen run per method)")
    parser.add_argument("--n-brats", type=int, default=50, help="BraTS cases to draw (default 50, as published)")
    parser.add_argument("--n-ixi", type=int, default=100, help="IXI scans to draw (default 100, as published)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scan choice and of the projection (default 0)")
    parser.add_argument("--brats-timepoints", default="000",
                        help="regular expression for the pre-treatment timepoint suffix of BraTS case ids "
                             "(default '000': the first scan of each patient)")
    parser.add_argument("--brats-cases", help="file listing the BraTS case ids to use (replaces --brats-timepoints)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help=f"methods to score, of {listed(METHODS)} (default both)")
    parser.add_argument("--backbone", help="timm backbone (default vit_large_patch14_dinov2.lvd142m, the paper's)")
    parser.add_argument("--weights", help="backbone weights file for offline use, or 'random' (pipeline check only)")
    parser.add_argument("--size", type=int, help="cube edge in voxels (default 224, as published)")
    parser.add_argument("--device", help="'auto' (default), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--template", help="SRI-24 template folder (default: $VOLSCAN_TEMPLATE or the user cache)")
    parser.add_argument("--cache", help="token/preprocessing cache folder shared by the methods' runs")
    parser.add_argument("--config", help="YAML/TOML file of `volscan screen` settings (flags above win)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    """Select the scans, screen them with each method, write the table; print where it is."""
    from pipelines.reproduce import run_reproduction
    from pipelines.screen_config import resolve_config

    config = resolve_config(args.config, backbone=args.backbone, weights=args.weights, size=args.size,
                            device=args.device, template=args.template, cache=args.cache, seed=args.seed)
    table = run_reproduction(args.brats, args.ixi, args.out, config, n_brats=args.n_brats, n_ixi=args.n_ixi,
                             seed=args.seed, brats_timepoints=args.brats_timepoints,
                             brats_cases=args.brats_cases, methods=args.methods, force=args.force)
    from pipelines.reproduce import table_markdown

    print(table_markdown(table).split("\n## ")[0].rstrip())
    print(f"\nwrote {args.out}/table.md and table.json")
    return 0
