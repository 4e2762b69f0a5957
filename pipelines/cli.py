"""The `volscan` command line: dispatches to `pipelines.commands.<name>` modules.

Only the chosen sub-command's module is imported, so `volscan --help` stays fast and a problem
in one command's optional dependencies cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from volumetric.errors import VolscanError

log = logging.getLogger("volscan")

# name -> (module under pipelines.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "screen": ("screen", "score a folder of volumes/images; write ranks, maps and a report"),
    "evaluate": ("evaluate", "recompute metrics of an existing screen run against labels"),
    "preprocess": ("preprocess", "register, mask, crop, resize and standardise a folder of NIfTI volumes"),
    "template": ("template", "locate or fetch the SRI-24 template"),
    "phantom": ("phantom", "generate a synthetic cohort with known lesions"),
    "demo": ("demo", "generate a small phantom cohort and screen it, offline"),
    "reproduce": ("reproduce", "reproduce a published experiment (brats-mets-ixi)"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the `chosen` sub-command's module adds its arguments."""
    parser = argparse.ArgumentParser(
        prog="volscan",
        description="Training-free anomaly detection in 3D medical images.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"pipelines.commands.{module_name}")
            module.add_parser(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `volscan` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args._run(args)
    except VolscanError as exc:
        print(f"volscan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"volscan {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
