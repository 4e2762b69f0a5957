"""`volscan score INPUT --cache CACHE -o OUT`: the group stage of a screen, from cached tokens.

Same arguments and outputs as `volscan screen`, but nothing per scan is computed and nothing is
written into CACHE (other parts and runs share it): every scan's preprocessing and tokens must
already be there (from `volscan extract`, possibly run as many `--part`s or on Ray), current
and intact, with the same settings; otherwise one error names the missing, stale or damaged
scans and the `volscan extract` command to run.
"""

from __future__ import annotations

import argparse

from pipelines.commands import screen as screen_command


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan score` (those of `volscan screen`)."""
    screen_command.add_parser(parser)


def run(args: argparse.Namespace) -> int:
    """Score the cohort from the cache and print where the results are."""
    from pipelines.screen import run_screen
    from pipelines.screen_config import resolve_config

    config = resolve_config(args.config, **{name: getattr(args, name) for name in screen_command.OVERRIDES})
    result = run_screen(args.input, args.out, config, labels_dir=args.labels, force=args.force, compute=False,
                        bids=screen_command.bids_selection(args), exports=args.export,
                        reference=screen_command.reference_request(args))
    return screen_command.print_result(result)
