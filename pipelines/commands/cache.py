"""`volscan cache du [CACHE]` and `volscan cache prune [CACHE] (--older-than DAYS | --all) [--yes]`.

`du` prints what the cache folder holds: preprocessing stores (with bytes per scan), token sets,
extract logs, downloads, files of interrupted writes and files volscan did not write. `prune`
lists what it would remove and removes it only with `--yes` (a dry run otherwise): volscan's
own entries last used DAYS ago or more (or all of them), the stale temporaries of killed runs,
and the folders left empty; never downloads or anything volscan did not write
(`pipelines.cache_files`). A pruned entry is recomputed by the next run that needs it.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.cache_files import CacheContents


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan cache`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    du = sub.add_parser("du", help="show what the cache holds and how big it is")
    du.add_argument("cache", nargs="?", metavar="CACHE", help="cache folder (default $VOLSCAN_CACHE_DIR or ~/.cache/volscan)")
    prune = sub.add_parser("prune", help="remove volscan's cache entries (a dry run without --yes)")
    prune.add_argument("cache", nargs="?", metavar="CACHE", help="cache folder (default $VOLSCAN_CACHE_DIR or ~/.cache/volscan)")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", type=float, metavar="DAYS",
                       help="entries whose last use by a screen or extract was DAYS days ago or more")
    which.add_argument("--all", action="store_true", help="every entry (downloads are kept)")
    prune.add_argument("--yes", action="store_true", help="remove them (without it: only list what would go)")


def run(args: argparse.Namespace) -> int:
    """Print the cache's contents, or prune it."""
    from pathlib import Path

    from pipelines.cache_files import human_bytes, remove, scan_cache, select
    from preprocessing.template import cache_dir
    from volumetric.errors import VolscanError

    contents = scan_cache(Path(args.cache) if args.cache else cache_dir())
    if args.action == "du":
        _print_contents(contents)
        return 0
    if args.older_than is not None and not (math.isfinite(args.older_than) and args.older_than >= 0):
        raise VolscanError(f"--older-than must be a number of days >= 0, got {args.older_than}")
    chosen = select(contents, None if args.all else args.older_than * 86400.0)
    size = sum(e.bytes for e in chosen)
    counts = ", ".join(f"{sum(e.kind == kind for e in chosen)} {name}" for kind, name in _KINDS)
    if not args.yes:
        print(f"would remove {counts} ({human_bytes(size)}) from {contents.root}; add --yes to remove them")
        return 0
    freed = remove(contents, chosen)
    print(f"removed {counts} ({human_bytes(freed)}) from {contents.root}; "
          f"{human_bytes(scan_cache(contents.root).total)} left")
    return 0


_KINDS = (("store", "preprocessing store(s)"), ("tokens", "token set(s)"), ("log", "extract log(s)"))


def _print_contents(contents: "CacheContents") -> None:
    """`volscan cache du`'s table: one line per kind of entry, with counts and bytes."""
    from pipelines.cache_files import human_bytes

    print(f"{contents.root}: {human_bytes(contents.total)}")
    stores = [e for e in contents.entries if e.kind == "store"]
    scans = sum(e.scans for e in stores)
    per_scan = f", {human_bytes(contents.bytes_of('store') / scans)} per scan" if scans else ""
    print(f"  preprocessing stores  {len(stores):>6}  {human_bytes(contents.bytes_of('store')):>10}  "
          f"({scans} scans{per_scan})")
    tokens = [e for e in contents.entries if e.kind == "tokens"]
    per_set = f", {human_bytes(contents.bytes_of('tokens') / len(tokens))} each" if tokens else ""
    print(f"  token sets            {len(tokens):>6}  {human_bytes(contents.bytes_of('tokens')):>10}  "
          f"(one per scan and setting{per_set})")
    logs = sum(e.kind == "log" for e in contents.entries)
    print(f"  extract logs          {logs:>6}  {human_bytes(contents.bytes_of('log')):>10}")
    print(f"  downloads                     {human_bytes(contents.downloads):>10}  (templates, HD-BET; never pruned)")
    if contents.temporaries:
        print(f"  interrupted writes    {len(contents.temporaries):>6}  "
              f"{human_bytes(sum(p.lstat().st_size for p in contents.temporaries)):>10}  (prune removes stale ones)")
    if contents.other:
        print(f"  not volscan's         {len(contents.other):>6}  "
              f"{human_bytes(sum(p.lstat().st_size for p in contents.other)):>10}  (never removed; e.g. {contents.other[0]})")
