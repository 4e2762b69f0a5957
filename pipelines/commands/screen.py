"""`volscan screen INPUT -o OUT`: rank a folder of scans, write native-space maps and a report.

Flags left unset fall back to the `--config` file, then to the defaults of `ScreenConfig`.
Heavy imports (torch, timm, the engine) happen inside `run` so `volscan --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines.choices import (BIAS_CORRECTIONS, BIDS_SUFFIXES, EXPORTS, HDBET_MODES, MASK_METHODS, METHODS, PRECISIONS,
                               listed)
from pipelines.screen_config import DEFAULT_BACKBONE

# CLI flag -> ScreenConfig field for the settings that can also come from the config file.
# SETTINGS: the per-scan settings of `add_settings_arguments` (shared with `volscan extract`);
# SCORING: those only the group stage uses (`screen` and `score`; `extract` does not offer them).
SETTINGS = (
    "backbone", "weights", "layers", "size", "proj_dim", "device", "registered", "skull_stripped", "brain_mask",
    "hdbet_mode", "bias_correction", "template", "seed", "precision", "slices_per_block",
)
SCORING = ("method", "window")
OVERRIDES = SETTINGS + SCORING + ("cache", "top", "histogram_bins", "flag_z", "viewer_scans")


def _groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The option groups of `--help`, created once per parser and reused."""
    groups = getattr(parser, "_volscan_groups", None)
    if groups is None:
        groups = {title: parser.add_argument_group(title) for title in GROUPS}
        parser._volscan_groups = groups  # type: ignore[attr-defined]
    return groups


GROUPS = ("inputs", "preprocessing", "features", "scoring", "outputs", "compute")


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan screen`, grouped as `--help` shows them."""
    groups = _groups(parser)
    groups["inputs"].add_argument("input", help="folder of NIfTI volumes (.nii/.nii.gz) or of 2D images "
                                  "(.png/.jpg/.tif), or a BIDS dataset root")
    groups["inputs"].add_argument("--labels", metavar="DIR",
                                  help="masks with the inputs' file names (absent/empty = healthy); adds metrics")
    add_bids_arguments(groups["inputs"])
    groups["scoring"].add_argument("--reference", metavar="RUN",
                                   help="score the inputs as new scans against a finished screen/score run's cached "
                                        "tokens, on its scale (percentiles and flag rule of the reference)")
    groups["scoring"].add_argument("--independent", action="store_true",
                                   help="with --reference: score each new scan against the reference alone, so its "
                                        "score does not depend on the other new scans")
    add_settings_arguments(parser)
    out = groups["outputs"]
    out.add_argument("-o", "--out", required=True, help="output folder (must not exist unless --force)")
    out.add_argument("--top", type=int, help="top-ranked scans drawn as panels in the report (default 6)")
    out.add_argument("--flag-z", type=float, help="flag scans whose score is more than Z robust standard deviations "
                     "above the cohort median; also the map threshold of hotspot regions (default 3)")
    out.add_argument("--histogram-bins", type=int, help="bins of the streaming voxel AUROC (default 65536)")
    out.add_argument("--viewer-scans", type=int, metavar="N", help="scans in the report's interactive viewer: the N "
                     "top-ranked plus every flagged one (default 20; 0 = no viewer)")
    out.add_argument("--force", action="store_true", help="replace a previous screen output folder")
    out.add_argument("--export", action="append", choices=EXPORTS, default=[],
                     help="also write OUT/mood/: per-scan score and map in [0, 1] as the MOOD challenge reads them")
    groups["compute"].add_argument("--cache", metavar="DIR", help="cache of preprocessed cubes and tokens "
                                   "(default $VOLSCAN_CACHE_DIR or ~/.cache/volscan)")


def add_bids_arguments(group: argparse._ArgumentGroup) -> None:
    """The BIDS input selection (`pipelines.bids`), shared with `volscan bids`."""
    group.add_argument("--bids-suffix", choices=BIDS_SUFFIXES, help="BIDS input: the scans' suffix (default T1w)")
    group.add_argument("--participant-label", nargs="+", metavar="LABEL",
                       help="BIDS input: only these participants (with or without 'sub-'; default all)")


def bids_selection(args: argparse.Namespace) -> Any:
    """The `BidsSelection` of the flags, or None when neither is given (plain folders, or a BIDS
    root read with its defaults)."""
    from pipelines.bids import BidsSelection

    if args.bids_suffix is None and not args.participant_label:
        return None
    return BidsSelection(args.bids_suffix or "T1w", tuple(args.participant_label or ()))


def add_settings_arguments(parser: argparse.ArgumentParser, scoring: bool = True) -> None:
    """The model and preprocessing settings shared by `screen`, `extract` and `score`, and with
    `scoring` the scoring ones (`--method`, `--window`: not for `extract`, which scores nothing).

    Defaults are shown in each help line; flags left unset take the `--config` file's value,
    then the default."""
    groups = _groups(parser)
    groups["inputs"].add_argument("--config", metavar="FILE", help="YAML/TOML file with any setting below plus "
                                  "scoring, backbone_kwargs, tokenizer and preprocess tables; flags override it")
    pre = groups["preprocessing"]
    pre.add_argument("--size", type=int, help="cube edge / square image side in voxels, multiple of 14 (default 224)")
    pre.add_argument("--registered", action=argparse.BooleanOptionalAction, default=None,
                     help="inputs are already in template (SRI-24) space: skip registration (default no)")
    pre.add_argument("--skull-stripped", action=argparse.BooleanOptionalAction, default=None,
                     help="inputs are already skull-stripped (default no)")
    pre.add_argument("--brain-mask", choices=MASK_METHODS,
                     help="brain extractor for raw scans (default auto: nonzero if skull-stripped, else deepbet, "
                          "else HD-BET on a GPU, else the template mask with a warning)")
    pre.add_argument("--hdbet-mode", choices=HDBET_MODES,
                     help="HD-BET: accurate (default; 5 folds with test-time mirroring) or fast (1 fold, no mirroring)")
    pre.add_argument("--bias-correction", choices=BIAS_CORRECTIONS,
                     help="N4 bias-field correction inside the brain mask before Nyúl (default auto: on for scans "
                     "volscan registers or skull-strips, off for --registered --skull-stripped inputs; none, n4 force it)")
    pre.add_argument("--template", metavar="PATH", help="template folder (default $VOLSCAN_TEMPLATE or the user cache)")
    feat = groups["features"]
    feat.add_argument("--backbone", metavar="NAME", help=f"timm ViT name, or 'classical' for weights-free intensity and texture features "
                      f"(default {DEFAULT_BACKBONE})")
    feat.add_argument("--weights", metavar="PATH|random",
                      help="local weights file, or 'random' for smoke tests (default: timm hub, needs internet once)")
    feat.add_argument("--layers", type=int, nargs="+", metavar="N",
                      help="backbone blocks (0-based) to take tokens from (default: the blocks at 1/2 and 3/4 of "
                           "the depth, e.g. 11 17 for ViT-L)")
    feat.add_argument("--proj-dim", type=int, metavar="R", help="JL projection width per axis (default 128)")
    feat.add_argument("--seed", type=int, help="seed of the JL projection and random weights (default 0)")
    feat.add_argument("--slices-per-block", type=int, metavar="K",
                      help="slices per 14-voxel block through the ViT, evenly spaced (default all 14; fewer = faster)")
    if scoring:
        groups["scoring"].add_argument("--method", choices=METHODS,
                                       help=f"scoring method: {listed(METHODS)} (default codegraph)")
        groups["scoring"].add_argument("--window", type=int, metavar="W",
                                       help="position-aware scoring for registered inputs: compare each token only "
                                            "with the other scans' tokens within W grid cells of its own (Chebyshev; "
                                            "0 = same cell; default: every token of every other scan)")
    groups["compute"].add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto: the first GPU if any)")
    groups["compute"].add_argument("--precision", choices=PRECISIONS,
                                   help=f"ViT arithmetic: {listed(PRECISIONS)} (default auto: bf16 on CUDA and on "
                                        "CPUs with native bf16, else fp32)")


def run(args: argparse.Namespace) -> int:
    """Run the screen and print where the results are."""
    from pipelines.screen import run_screen
    from pipelines.screen_config import resolve_config

    config = resolve_config(args.config, **{name: getattr(args, name) for name in OVERRIDES})
    result = run_screen(args.input, args.out, config, labels_dir=args.labels, force=args.force,
                        bids=bids_selection(args), exports=args.export,
                        reference=reference_request(args))
    return print_result(result)


def reference_request(args: argparse.Namespace) -> Any:
    """`--reference RUN [--independent]` as a `ReferenceRequest`, or None; `--independent` alone is an error."""
    from pipelines.reference import ReferenceRequest
    from volumetric.errors import VolscanError

    if args.reference is None:
        if args.independent:
            raise VolscanError("--independent applies to --reference RUN only")
        return None
    return ReferenceRequest(Path(args.reference), independent=args.independent)


def print_result(result: Any) -> int:
    """Print the top of a finished run's ranking, its metrics, warnings and report path; 0.
    Ids and warnings are printed through `printable` (one line each, whatever the file names)."""
    from pipelines.safe_text import printable

    summary = result.report["summary"]
    print(f"screened {len(result.rows)} {result.report['kind'].upper()} inputs; {len(summary['flagged'])} flagged as "
          f"outliers ({summary['flag_rule']}); most suspicious:")
    for row in result.rows[: min(5, len(result.rows))]:
        print(f"  {row.rank:>3}  {printable(row.id)}  {row.score:.5g}")
    metrics = result.metrics
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith(("threshold", "bound"))}
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for warning in result.report["warnings"]:
        print(f"WARNING: {printable(warning)}", file=sys.stderr)
    if result.report.get("cache"):
        from pipelines.cache_files import usage_line

        print(usage_line(result.report["cache"]))
    print(f"report: {printable(str(result.report_html))}")
    return 0
