"""The `volscan` command line: dispatches to `pipelines.commands.<name>` modules.

Only the chosen sub-command's module is imported, so `volscan --help` stays fast and a problem
in one command's optional dependencies cannot take the others down; the commands import torch
and friends only after their inputs are checked, so a wrong path is answered at once.

Logging: volscan's own messages at INFO (DEBUG with -vv); third-party packages (matplotlib,
timm, huggingface_hub, urllib3, ...) only from WARNING unless -v. Every distinct message
(Python warnings included) is printed once per run. Every message and error line goes through
`pipelines.safe_text.printable`: a file name holding control characters or newlines is shown
escaped, on one line.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence

from pipelines.failures import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, os_error_line, sigterm_raises
from pipelines.safe_text import printable
from volumetric.errors import VolscanError

log = logging.getLogger("volscan")

# name -> (module under pipelines.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "screen": ("screen", "score a folder of volumes/images; write ranks, maps and a report"),
    "extract": ("extract", "per-scan stage only (preprocess + tokens) into the cache; --part i/n, --ray"),
    "score": ("score", "group stage only: screen from tokens cached by extract (computes no tokens)"),
    "bids": ("bids", "BIDS App: bids_dir output_dir participant|group, writing BIDS Derivatives"),
    "evaluate": ("evaluate", "recompute metrics of an existing screen run against labels"),
    "preprocess": ("preprocess", "register, mask, crop, resize and standardise a folder of NIfTI volumes"),
    "template": ("template", "locate or fetch the SRI-24 template"),
    "cache": ("cache", "show (du) or prune the cache of preprocessed cubes and tokens"),
    "phantom": ("phantom", "generate a synthetic cohort with known lesions"),
    "demo": ("demo", "generate a small phantom cohort and screen it, offline"),
    "reproduce": ("reproduce", "reproduce a published experiment (brats-mets-ixi)"),
}
OWN_LOGGERS = ("volscan", "volumetric", "preprocessing", "pipelines", "benchmarks")


def build_parser(chosen: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """(top-level parser, the `chosen` sub-command's parser); only the chosen sub-command's
    module adds its arguments."""
    from volumetric.hashing import volscan_version  # not at the top: it imports numpy, which `--help` does not need

    parser = argparse.ArgumentParser(
        prog="volscan",
        description="Training-free anomaly detection in 3D medical images.",
    )
    parser.add_argument("--version", action="version", version=f"volscan {volscan_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v adds other packages' INFO lines, -vv debug")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen_parser = None
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"pipelines.commands.{module_name}")
            module.add_parser(cmd)
            cmd.set_defaults(_run=module.run)
            chosen_parser = cmd
    return parser, chosen_parser


def _closest_option(parser: argparse.ArgumentParser, unknown: str) -> str | None:
    options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    match = difflib.get_close_matches(unknown.split("=", 1)[0], options, n=1, cutoff=0.6)
    return match[0] if match else None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; an unknown option is answered with the sub-command's usage and the
    closest option it has (argparse alone would print the top-level usage)."""
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser, command_parser = build_parser(chosen)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        target = command_parser or parser
        hint = _closest_option(target, next((u for u in unknown if u.startswith("-")), unknown[0]))
        target.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {hint}?)" if hint else ""))
    return args


class _Once(logging.Filter):
    """Let each distinct message through once (e.g. hub retry warnings logged twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _CliHandler(logging.StreamHandler):
    """stderr handler of the `volscan` command (replaced, not stacked, when `main` runs again)."""


class _PrintableFormatter(logging.Formatter):
    """One line per message: control characters in it (from file names) shown escaped; a
    traceback (-vv) keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def configure_logging(verbose: int) -> None:
    """volscan loggers at INFO (DEBUG when `verbose` >= 2); others at WARNING unless `verbose`;
    Python warnings through logging; each distinct message once."""
    handler = _CliHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    # Re-installed each time: something else in this process (a test harness, a notebook) may
    # have replaced warnings.showwarning since an earlier main().
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `volscan` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    configure_logging(args.verbose)
    try:
        with sigterm_raises():
            code = args._run(args)
    except VolscanError as exc:
        print(f"volscan {args.command}: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permission denied, ...: one line naming the path
        log.debug("system error", exc_info=True)
        print(f"volscan {args.command}: error: {printable(os_error_line(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"volscan {args.command}: interrupted; partial outputs removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"volscan {args.command}: terminated (SIGTERM); partial outputs removed", file=sys.stderr)
        return EXIT_TERMINATED
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
