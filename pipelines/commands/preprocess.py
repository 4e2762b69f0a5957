"""`volscan preprocess INPUT_DIR -o OUT_DIR`: register, mask, crop, resize and Nyúl-standardise a folder."""

from __future__ import annotations

import argparse

from preprocessing.choices import BIAS_CORRECTIONS, CONTRASTS, HDBET_MODES, MASK_METHODS


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan preprocess`."""
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder of .nii/.nii.gz volumes (or DICOM series folders)")
    parser.add_argument("-o", "--out", dest="out_dir", required=True, metavar="OUT_DIR", help="output folder")
    parser.add_argument("--template", metavar="PATH", help="template folder (default: $VOLSCAN_TEMPLATE, then the cache)")
    parser.add_argument("--size", type=int, help="cube edge in voxels, a multiple of 14 (default 224)")
    parser.add_argument("--skull-stripped", action="store_true", help="inputs are skull-stripped (brain mask = non-zero voxels)")
    parser.add_argument("--registered", action="store_true", help="inputs are already in template space (skip registration)")
    parser.add_argument(
        "--brain-mask", choices=MASK_METHODS,
        help="brain extractor (default auto: nonzero if --skull-stripped, else deepbet, else HD-BET if "
             "installed and --mask-device is a GPU, else the registered template mask with a warning)",
    )
    parser.add_argument(
        "--contrast", choices=CONTRASTS,
        help="scan contrast for --brain-mask auto (default: guessed from each file name)",
    )
    parser.add_argument("--hdbet-mode", choices=HDBET_MODES,
                        help="HD-BET: accurate (default; 5 folds with test-time mirroring) or fast (1 fold, no mirroring)")
    parser.add_argument("--mask-device", help="device of the learned extractors: cpu (default), cuda, cuda:N")
    parser.add_argument("--margin-mm", type=float, help="crop margin around the template brain (mm, default 4)")
    parser.add_argument("--cubic", action="store_true", help="cubic crop box (same extent on every axis)")
    parser.add_argument("--bias-correction", choices=BIAS_CORRECTIONS,
                        help="N4 bias-field correction inside the brain mask before Nyúl (default auto: on for scans "
                     "volscan registers or skull-strips, off for --registered --skull-stripped inputs; none, n4 force it)")
    parser.add_argument("--landmarks", metavar="FILE", help="reuse Nyúl landmarks (.npy) instead of learning them")
    parser.add_argument(
        "--cutoff", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="Nyúl cutoff quantiles when learning landmarks (default 0.01 0.99)",
    )
    parser.add_argument("--workers", type=int, default=1, help="volumes processed in parallel processes (default 1)")
    parser.add_argument("--force", action="store_true", help="recompute and overwrite existing outputs")


def run(args: argparse.Namespace) -> int:
    """Preprocess every volume of INPUT_DIR into OUT_DIR; print a one-line summary."""
    from preprocessing.cohort import preprocess_cohort
    from preprocessing.io import find_volumes
    from preprocessing.settings import PreprocessSettings

    from pipelines.run_folder import check_output_dir, resumable_output
    from pipelines.validation import check_int, validate_preprocess

    # The validation pass, before any work: the settings first (a typo is the first error); OUT
    # overlaps no input (equal, parent or child) and is new or a previous preprocess output
    # (resumed); the template, landmarks, headers.
    # Flags left unset keep PreprocessSettings' defaults (listed there once).
    names = ("size", "registered", "skull_stripped", "brain_mask", "contrast", "hdbet_mode", "mask_device",
             "margin_mm", "cubic", "bias_correction", "cutoff", "landmarks")
    settings = PreprocessSettings(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    check_int("--workers", args.workers, 1, 1024)
    out = check_output_dir(args.out_dir, args.force, (args.input_dir,), command="preprocess", resume=True)
    paths = find_volumes(args.input_dir)
    validate_preprocess(paths, args.template, args.landmarks)
    with resumable_output(out, "preprocess"):  # marked as volscan's own, so later runs may resume into it
        result = preprocess_cohort(paths, out, settings, template=args.template, force=args.force,
                                   workers=args.workers)
    methods = sorted({r.brain_mask for r in result.records})
    skipped = len(result.records) - len(result.computed)
    print(
        f"preprocessed {len(result.records)} volume(s) into {out} "
        f"({len(result.computed)} computed, {skipped} already done; brain mask: {', '.join(methods)}); "
        f"landmarks: {result.landmarks_path}"
    )
    warned = [r for r in result.records if r.warnings]
    if warned:
        names = ", ".join(r.id for r in warned)
        print(f"warning: brain mask of {len(warned)} scan(s) ({names}): {warned[0].warnings[0]}")
    return 0
