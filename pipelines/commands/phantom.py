"""`volscan phantom OUT`: write a synthetic cohort with known lesions (see `pipelines.phantom`)."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan phantom`."""
    parser.add_argument("out", help="output folder (images/, labels/, template/, cohort.json)")
    parser.add_argument("--normal", type=int, default=20, help="healthy subjects (default 20)")
    parser.add_argument("--lesion", type=int, default=5, help="subjects with their own random lesions (default 5)")
    parser.add_argument("--consistent", type=int, default=5,
                        help="subjects sharing one lesion pattern at one place (default 5; 0 or >= 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--size", type=int, default=96,
                        help="template grid edge in voxels over a 200 mm field of view (default 96, ~2.1 mm)")
    parser.add_argument("--template", default="auto",
                        help="anatomy: 'auto' (default: the SRI-24 brain if a template is resolvable via "
                             "$VOLSCAN_TEMPLATE or the user cache, else the procedural head), 'procedural' "
                             "(built-in head, identical on every machine) or a template folder")
    parser.add_argument("--lesions-per-subject", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"),
                        help="number of lesions in each random-lesion subject (default 1 1)")
    parser.add_argument("--noise", type=float, default=0.03, help="Rician noise sigma relative to CSF (default 0.03)")
    parser.add_argument("--bias", type=float, default=0.15, help="bias-field strength (default 0.15)")
    parser.add_argument("--force", action="store_true", help="replace an existing phantom cohort at OUT")


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print where it is and how to screen it."""
    from pipelines.phantom import PhantomConfig, generate_cohort

    config = PhantomConfig(n_normal=args.normal, n_lesion=args.lesion, n_consistent=args.consistent,
                           seed=args.seed, size=args.size, template=args.template,
                           lesions_per_subject=tuple(args.lesions_per_subject), noise=args.noise,
                           bias_strength=args.bias)
    cohort = generate_cohort(args.out, config, force=args.force)
    counts = ", ".join(f"{len(cohort.members(g))} {g}" for g in ("normal", "lesion", "consistent"))
    print(f"wrote {len(cohort.subjects)} subjects ({counts}; anatomy: {cohort.info['anatomy']}) to {cohort.root}")
    print(f"screen it: volscan screen {cohort.images_dir} --labels {cohort.labels_dir} "
          f"--template {cohort.template_dir} -o {cohort.root}-screen")
    return 0
