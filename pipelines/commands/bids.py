"""`volscan bids BIDS_DIR OUTPUT_DIR participant|group`: volscan as a BIDS App.

`participant` runs the per-scan stage (as `volscan extract`) for `--participant-label`'s
participants (default all); `group` screens every scan from the cache (as `volscan score`) and
writes BIDS Derivatives into OUTPUT_DIR (`pipelines.bids_app`, `pipelines.bids_derivatives`).
Give both levels the same settings and `--cache`. See docs/screen.md ("BIDS").
"""

from __future__ import annotations

import argparse

from pipelines.bids_app import LEVELS
from pipelines.choices import EXPORTS, EXTRACT_STAGES
from pipelines.commands.screen import OVERRIDES, SCORING, add_bids_arguments, add_settings_arguments, print_result


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan bids`."""
    parser.add_argument("bids_dir", help="BIDS dataset root (holds dataset_description.json)")
    parser.add_argument("output_dir", help="derivatives folder to write, e.g. BIDS_DIR/derivatives/volscan")
    parser.add_argument("analysis_level", choices=LEVELS,
                        help="participant: per-scan stage into the cache; group: screen and write the derivatives")
    add_bids_arguments(parser.add_argument_group("BIDS input"))
    add_settings_arguments(parser)
    parser.add_argument("--cache", metavar="DIR", help="cache of preprocessed cubes and tokens, shared by both levels "
                        "(default $VOLSCAN_CACHE_DIR or ~/.cache/volscan)")
    parser.add_argument("--stage", choices=EXTRACT_STAGES, default="all",
                        help="participant level: per-scan phases to run (default all; see volscan extract)")
    group = parser.add_argument_group("group level")
    group.add_argument("--top", type=int, help="top-ranked scans drawn as panels in the report (default 6)")
    group.add_argument("--flag-z", type=float, help="flag rule: robust z-score threshold (default 3)")
    group.add_argument("--histogram-bins", type=int, help="bins of the streaming voxel AUROC (default 65536)")
    group.add_argument("--viewer-scans", type=int, metavar="N", help="scans in the report's viewer (default 20)")
    group.add_argument("--export", action="append", choices=EXPORTS, default=[],
                       help="also write the MOOD challenge files into the run folder "
                       "(OUTPUT_DIR/volscan/<suffix>/mood)")


def run(args: argparse.Namespace) -> int:
    """Run the chosen analysis level and print a summary."""
    from pipelines.bids import BidsSelection
    from pipelines.bids_app import run_group, run_participant
    from pipelines.safe_text import printable
    from pipelines.screen_config import resolve_config
    from volumetric.errors import VolscanError

    # Options of the other level are refused, never accepted and dropped.
    if args.analysis_level == "participant":
        given = [f"--{name}" for name in SCORING if getattr(args, name) is not None]
        given += ["--export"] if args.export else []
        if given:
            raise VolscanError(f"{', '.join(given)} belong(s) to the group level, which scores; the participant level "
                               "only prepares each scan")
    elif args.stage != "all":
        raise VolscanError("--stage belongs to the participant level; the group level scores every scan from the cache")
    config = resolve_config(args.config, **{name: getattr(args, name) for name in OVERRIDES})
    selection = BidsSelection(args.bids_suffix or "T1w", tuple(args.participant_label or ()))
    if args.analysis_level == "participant":
        result = run_participant(args.bids_dir, args.output_dir, config, selection, stage=args.stage)
        print(f"participant level ({args.stage}): {len(result.scans)} scan(s), {result.computed} token set(s) "
              f"computed, {len(result.failed)} failed; cache: {result.cache_root}")
        if result.failed:
            print(printable(f"{len(result.failed)} scan(s) failed, e.g. {result.failed[0].id}: "
                            f"{result.failed[0].error}; error log: {result.error_log}"))
            return 1
        return 0
    result, written = run_group(args.bids_dir, args.output_dir, config, selection, exports=args.export)
    code = print_result(result)
    print(f"BIDS derivatives: {len(written)} file(s) in {printable(str(args.output_dir))}")
    return code
