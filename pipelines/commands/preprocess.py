"""`volscan preprocess INPUT_DIR -o OUT_DIR`: register, mask, crop, resize and Nyúl-standardise a folder."""

from __future__ import annotations

import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan preprocess`."""
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder of .nii/.nii.gz volumes (or DICOM series folders)")
    parser.add_argument("-o", "--out", dest="out_dir", required=True, metavar="OUT_DIR", help="output folder")
    parser.add_argument("--template", metavar="PATH", help="template folder (default: $VOLSCAN_TEMPLATE, then the cache)")
    parser.add_argument("--size", type=int, default=224, help="cube edge in voxels, a multiple of 14 (default 224)")
    parser.add_argument("--skull-stripped", action="store_true", help="inputs are skull-stripped (brain mask = non-zero voxels)")
    parser.add_argument("--registered", action="store_true", help="inputs are already in template space (skip registration)")
    parser.add_argument(
        "--mask-method", default="auto", choices=("auto", "nonzero", "template", "hd-bet"),
        help="brain mask: auto = nonzero if --skull-stripped else template (default auto)",
    )
    parser.add_argument("--landmarks", metavar="FILE", help="reuse Nyúl landmarks (.npy) instead of learning them")
    parser.add_argument(
        "--cutoff", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(0.01, 0.99),
        help="Nyúl cutoff quantiles when learning landmarks (default 0.01 0.99)",
    )
    parser.add_argument("--workers", type=int, default=1, help="volumes processed in parallel processes (default 1)")
    parser.add_argument("--force", action="store_true", help="recompute and overwrite existing outputs")


def run(args: argparse.Namespace) -> int:
    """Preprocess every volume of INPUT_DIR into OUT_DIR; print a one-line summary."""
    from pathlib import Path

    from preprocessing.io import find_volumes
    from preprocessing.pipeline import preprocess_cohort

    paths = find_volumes(args.input_dir)
    out = Path(args.out_dir)
    if out.resolve() == Path(args.input_dir).resolve():
        from volumetric.errors import VolscanError

        raise VolscanError(f"{out}: the output folder must differ from the input folder")
    result = preprocess_cohort(
        paths,
        out,
        template=args.template,
        size=args.size,
        registered=args.registered,
        skull_stripped=args.skull_stripped,
        mask_method=args.mask_method,
        landmarks=args.landmarks,
        cutoff=tuple(args.cutoff),
        force=args.force,
        workers=args.workers,
    )
    skipped = len(result.records) - len(result.computed)
    print(
        f"preprocessed {len(result.records)} volume(s) into {out} "
        f"({len(result.computed)} computed, {skipped} already done); landmarks: {result.landmarks_path}"
    )
    return 0
