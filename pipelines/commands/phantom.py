"""`volscan phantom -o OUT`: write a synthetic cohort with known lesions (see `pipelines.phantom`)."""

from __future__ import annotations

import argparse

from volumetric.errors import VolscanError


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan phantom`."""
    parser.add_argument("-o", "--out", help="output folder (images/, labels/, template/, cohort.json); required")
    # The output folder used to be positional: still accepted by the parser, only to answer with the new form.
    parser.add_argument("legacy_out", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--normal", type=int, default=20, help="healthy subjects (default 20)")
    parser.add_argument("--lesion", type=int, default=5, help="subjects with their own random lesions (default 5)")
    parser.add_argument("--consistent", type=int, default=5,
                        help="subjects sharing one lesion pattern at one place (default 5; 0 or >= 2)")
    parser.add_argument("--lookalike", type=int, default=0,
                        help="subjects with look-alike lesions (one shared appearance) at random places (default 0); "
                             "the BraTS-METS vs IXI regime is e.g. --normal 40 --lesion 0 --consistent 0 --lookalike 20")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--size", type=int, default=96,
                        help="template grid edge in voxels over a 200 mm field of view (default 96, ~2.1 mm)")
    parser.add_argument("--template", default="auto",
                        help="anatomy: 'auto' (default: the brain of the resolved template: $VOLSCAN_TEMPLATE, "
                             "the user cache, else the SRI-24 installed with volscan), 'procedural' "
                             "(built-in head, identical on every machine) or a template folder")
    parser.add_argument("--lesions-per-subject", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"),
                        help="number of lesions in each random-lesion subject (default 1 1)")
    parser.add_argument("--lookalike-lesions", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                        help="number of lesions in each look-alike subject (default 1 3)")
    parser.add_argument("--lesion-radius", type=float, nargs=2, default=(7.0, 16.0), metavar=("MIN", "MAX"),
                        help="outer lesion radius range in mm, every group (default 7 16)")
    parser.add_argument("--contrast", default="t2",
                        help="lesion brightness: 'subtle' (0.7: edema like grey matter), 't2' (1.0, default: edema "
                             "between grey matter and CSF, core like CSF), 'bright' (1.5: clearly brighter than CSF), "
                             "or any positive multiplier of the lesion levels")
    parser.add_argument("--polarity", choices=("bright", "dark"), default="bright",
                        help="lesions brighter than the tissue (default) or 'dark': each level mirrored around "
                             "white matter (WM^2 / level), as much darker than white matter as bright ones are brighter")
    parser.add_argument("--artefact-scans", type=int, default=0,
                        help="healthy subjects given a whole-scan artefact, labels kept healthy (default 0)")
    parser.add_argument("--artefacts", nargs="+", default=None, metavar="KIND",
                        help="artefact kinds used in turn: ghosting, spike, wrap, missing-slices, contrast (default all)")
    parser.add_argument("--sites", type=int, default=3, help="scanner sites (default 3)")
    parser.add_argument("--site-profiles", action="store_true",
                        help="give each site its own intensity response curve (gamma 0.8-1.25), noise (0.02-0.06), "
                             "blur (FWHM 0-2.5 mm) and bias strength (0.05-0.3), subjects assigned to sites in turn "
                             "(default: sites differ in intensity scale only)")
    parser.add_argument("--atrophy-fraction", type=float, default=0.0,
                        help="share of the healthy subjects rendered as normal variation (enlarged ventricles, "
                             "thinner cortex; labels stay healthy; procedural anatomy only), e.g. 0.25 (default 0)")
    parser.add_argument("--ventricle-factor", type=float, default=2.0,
                        help="ventricle volume multiplier of the atrophic subgroup (default 2.0)")
    parser.add_argument("--cortical-atrophy-mm", type=float, default=2.0,
                        help="cortical thinning of the atrophic subgroup in mm (default 2.0)")
    parser.add_argument("--noise", type=float, default=0.03, help="Rician noise sigma relative to CSF (default 0.03)")
    parser.add_argument("--bias", type=float, default=0.15, help="bias-field strength (default 0.15)")
    parser.add_argument("--force", action="store_true", help="replace an existing phantom cohort at OUT")


def _contrast(value: str) -> float:
    from pipelines.phantom import CONTRASTS

    if value in CONTRASTS:
        return CONTRASTS[value]
    try:
        return float(value)
    except ValueError:
        raise VolscanError(f"--contrast must be one of {', '.join(CONTRASTS)} or a number, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and print where it is and how to screen it."""
    if args.legacy_out is not None:
        raise VolscanError(f"the output folder is now an option: volscan phantom -o {args.legacy_out} ...")
    if args.out is None:
        raise VolscanError("give the output folder with -o OUT")
    from pipelines.phantom import GROUPS, AtrophySettings, LesionSettings, PhantomConfig, SiteSettings, generate_cohort

    config = PhantomConfig(n_normal=args.normal, n_lesion=args.lesion, n_consistent=args.consistent,
                           n_lookalike=args.lookalike, seed=args.seed, size=args.size, template=args.template,
                           lesions_per_subject=tuple(args.lesions_per_subject),
                           lookalike_lesions=tuple(args.lookalike_lesions), noise=args.noise, bias_strength=args.bias,
                           artefact_scans=args.artefact_scans, n_sites=args.sites,
                           site_profiles=SiteSettings() if args.site_profiles else None,
                           atrophy=AtrophySettings(args.atrophy_fraction, args.ventricle_factor,
                                                   args.cortical_atrophy_mm),
                           **({"artefacts": tuple(args.artefacts)} if args.artefacts else {}),
                           lesions=LesionSettings(radius_mm=tuple(args.lesion_radius), contrast=_contrast(args.contrast),
                                                   polarity=args.polarity))
    cohort = generate_cohort(args.out, config, force=args.force)
    counts = ", ".join(f"{len(cohort.members(g))} {g}" for g in GROUPS if cohort.members(g))
    print(f"wrote {len(cohort.subjects)} subjects ({counts}; anatomy: {cohort.info['anatomy']}) to {cohort.root}")
    print(f"screen it: volscan screen {cohort.images_dir} --labels {cohort.labels_dir} "
          f"--template {cohort.template_dir} -o {cohort.root}-screen")
    return 0
