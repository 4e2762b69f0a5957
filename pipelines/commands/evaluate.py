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
    parser.add_argument("--force", action="store_true", help="replace metrics the run already holds")


def run(args: argparse.Namespace) -> int:
    """Compute, store and print the metrics."""
    from pipelines.evaluate import evaluate_run
    from pipelines.outputs import system_errors_as_input_errors
    from volumetric.errors import VolscanError

    if args.histogram_bins is not None and args.histogram_bins < 2:
        raise VolscanError(f"--histogram-bins must be >= 2, got {args.histogram_bins}")
    with system_errors_as_input_errors():
        metrics = evaluate_run(args.run, args.labels, force=args.force, bins=args.histogram_bins)
    for key, value in metrics.items():
        if key == "notes":
            for note in value:
                print(f"note: {note}")
        else:
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"report: {args.run.rstrip('/')}/report.html")
    return 0
