"""`volscan extract INPUT -o CACHE`: the per-scan stage (preprocess + tokens) into the shared cache.

Then `volscan score INPUT --cache CACHE -o OUT` runs the group stage. `--part i/n` takes a
deterministic share of the scans (Slurm arrays), `--ray [ADDRESS]` runs one Ray task per scan
(needs `pip install 'volscan[ray]'`). Exit code 0 when every scan of the part succeeded, 1 when
some failed (the others are done; see the printed error log), 2 on a bad command.
See docs/scale.md.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.choices import EXTRACT_STAGES
from pipelines.commands.screen import SCORING, SETTINGS, add_bids_arguments, add_settings_arguments


class _ScoringOnly(argparse.Action):
    """A scoring option given to extract (which scores nothing): refused, saying where it belongs."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} applies to scoring, which extract does not do; give it to volscan score")


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan extract`."""
    parser.add_argument("input", help="folder of NIfTI volumes (.nii/.nii.gz) or of 2D images (.png/.jpg/.tif), "
                        "or a BIDS dataset root")
    parser.add_argument("-o", "--cache", metavar="DIR", help="the shared cache to fill (default $VOLSCAN_CACHE_DIR "
                        "or ~/.cache/volscan); give the same one to volscan score")
    add_bids_arguments(parser.add_argument_group("BIDS input"))
    add_settings_arguments(parser, scoring=False)  # extract scores nothing: no --method, no --window
    for flag in SCORING:
        parser.add_argument(f"--{flag}", action=_ScoringOnly, help=argparse.SUPPRESS)
    parser.add_argument("--part", metavar="I/N", default="1/1",
                        help="only part I of N (1 <= I <= N) of the scans sorted by id, e.g. $SLURM_ARRAY_TASK_ID/100")
    parser.add_argument("--stage", choices=EXTRACT_STAGES, default="all",
                        help="per-scan phases to run (default all); sharded runs with learned Nyúl landmarks "
                        "run spatial (each part), landmarks (once), tokens (each part)")
    ray = parser.add_argument_group("Ray (pip install 'volscan[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="one Ray task per scan; ADDRESS of a running cluster (e.g. auto, ray://head:10001), "
                     "or none for a local cluster on this machine")
    ray.add_argument("--ray-cpus-per-scan", type=float, default=1.0, metavar="C", help="CPUs of one scan's task (default 1)")
    ray.add_argument("--ray-gpus-per-scan", type=float, metavar="G",
                     help="GPUs of one scan's task (default 1 when the cluster has GPUs and --device is not cpu, else 0)")
    ray.add_argument("--ray-max-retries", type=int, default=3, metavar="K",
                     help="restarts of a scan's task after its worker died (default 3)")
    ray.add_argument("--ray-local-cpus", type=int, metavar="N",
                     help="CPUs of the local cluster, i.e. concurrent scans at one CPU each (default: all)")


def run(args: argparse.Namespace) -> int:
    """Run the per-scan stage for the chosen part and print a summary."""
    # Here, not at the top: `volscan --help` and `volscan extract --help` load none of these.
    from pipelines.distributed.extract import ExtractSettings, extract_planned
    from pipelines.distributed.runners import RaySettings
    from pipelines.distributed.sharding import Part
    from pipelines.bids import cohort_subjects
    from pipelines.commands.screen import bids_selection
    from pipelines.plan import build_plan, check_settings
    from pipelines.safe_text import printable
    from pipelines.screen_config import resolve_config

    config = resolve_config(args.config, cache=args.cache, **{name: getattr(args, name) for name in SETTINGS})
    checked = check_settings(config)  # before the input folder is read: a typo is the first error
    ray = None
    if args.ray is not None:
        ray = RaySettings(
            address=None if args.ray == "local" else args.ray, cpus_per_scan=args.ray_cpus_per_scan,
            gpus_per_scan=args.ray_gpus_per_scan, max_retries=args.ray_max_retries, local_cpus=args.ray_local_cpus,
        )
    settings = ExtractSettings(part=Part.parse(args.part), stage=args.stage, ray=ray)
    subjects = cohort_subjects(args.input, bids_selection(args), None, registered=config.registered,
                               skull_stripped=config.skull_stripped)  # plain folder or BIDS root (pipelines.bids)
    result = extract_planned(build_plan(sorted(subjects, key=lambda s: s.id), checked), settings)
    from pipelines.cache_files import folder_bytes, human_bytes

    timings = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in result.seconds.items())
    print(f"extract {args.stage} of part {args.part}: {len(result.scans)} scan(s), {result.computed} token set(s) "
          f"computed, {len(result.failed)} failed ({timings}); cache: {result.cache_root} "
          f"({human_bytes(folder_bytes(result.cache_root))}; volscan cache du / prune)")
    if result.failed:  # the error text may quote file names: one line, control characters escaped
        print(printable(f"{len(result.failed)} scan(s) failed, e.g. {result.failed[0].id}: {result.failed[0].error}; "
                        f"error log: {result.error_log}"), file=sys.stderr)
        return 1
    return 0
