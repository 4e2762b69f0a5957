"""`volscan evaluate OUT --labels DIR`: recompute the metrics of an existing screen run.

Uses the run's stored token-grid scores and native mappings (no model, no preprocessing);
rewrites report.json / report.html / scores.csv and the score figures in place, atomically.
"""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan evaluate`."""
    parser.add_argument("run", metavar="OUT", help="output folder of a finished `volscan screen` run")
    parser.add_argument("--labels", metavar="DIR", required=True,
                        help="masks with the inputs' file names (absent/empty = healthy)")
    parser.add_argument("--histogram-bins", type=int, help="bins of the streaming voxel AUROC (default: the run's)")
    parser.add_argument("--force", action="store_true",
                        help="replace metrics the run holds against another masks folder (the same folder: recomputed without it)")


def run(args: argparse.Namespace) -> int:
    """Compute, store and print the metrics."""
    from pipelines.evaluate import evaluate_run
    from pipelines.run_folder import verify_run, write_run_marker
    from pipelines.run_layout import ELEMENTS_FILE, MAPPINGS_DIR, MAPS_DIR
    from pipelines.validation import MAX_HISTOGRAM_BINS, check_int

    # The validation pass: options in range, and the run is a finished screen output whose
    # files read here (scores, mappings, maps) are byte for byte what the screen wrote.
    if args.histogram_bins is not None:
        check_int("--histogram-bins", args.histogram_bins, 2, MAX_HISTOGRAM_BINS)
    verify_run(args.run, "screen", (ELEMENTS_FILE, f"{MAPPINGS_DIR}/", f"{MAPS_DIR}/"))
    metrics = evaluate_run(args.run, args.labels, force=args.force, bins=args.histogram_bins)
    write_run_marker(args.run, "screen")  # the rewritten report files get their new checksums
    for key, value in metrics.items():
        if key == "notes":
            for note in value:
                print(f"note: {note}")
        else:
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"report: {args.run.rstrip('/')}/report.html")
    return 0
