"""`volscan screen INPUT -o OUT`: rank a folder of scans, write native-space maps and a report.

Flags left unset fall back to the `--config` file, then to the defaults of `ScreenConfig`.
Heavy imports (torch, timm, the engine) happen inside `run` so `volscan --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

# CLI flag -> ScreenConfig field for the settings that can also come from the config file.
_OVERRIDES = (
    "method", "backbone", "weights", "layers", "size", "proj_dim", "device", "registered",
    "skull_stripped", "template", "cache", "seed", "top", "histogram_bins",
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `volscan screen`."""
    parser.add_argument("input", help="folder of NIfTI volumes (.nii/.nii.gz) or of 2D images (.png/.jpg/.tif)")
    parser.add_argument("-o", "--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--labels", metavar="DIR", help="masks with the inputs' file names (absent/empty = healthy)")
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML file with any setting below plus scoring, "
                        "backbone_kwargs, tokenizer and preprocess tables; flags override it")
    parser.add_argument("--method", choices=("codegraph", "musc"), help="scoring method (default codegraph)")
    parser.add_argument("--backbone", metavar="NAME", help="timm ViT name (default vit_large_patch14_dinov2.lvd142m)")
    parser.add_argument("--weights", metavar="PATH|random",
                        help="local weights file, or 'random' for smoke tests (default: timm hub, needs internet once)")
    parser.add_argument("--layers", type=int, nargs="+", metavar="N", help="backbone blocks to take tokens from")
    parser.add_argument("--size", type=int, help="cube edge / square image side, multiple of 14 (default 224)")
    parser.add_argument("--proj-dim", type=int, metavar="R", help="JL projection width per axis")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--registered", action=argparse.BooleanOptionalAction, default=None,
                        help="inputs are already in template (SRI-24) space: skip registration")
    parser.add_argument("--skull-stripped", action=argparse.BooleanOptionalAction, default=None,
                        help="inputs are already skull-stripped")
    parser.add_argument("--template", metavar="PATH", help="template folder (default $VOLSCAN_TEMPLATE or the user cache)")
    parser.add_argument("--cache", metavar="DIR", help="cache of preprocessed cubes and tokens "
                        "(default $VOLSCAN_CACHE_DIR or ~/.cache/volscan)")
    parser.add_argument("--seed", type=int, help="seed of the JL projection and random weights (default 0)")
    parser.add_argument("--top", type=int, help="number of top-ranked scans shown in the report (default 6)")
    parser.add_argument("--histogram-bins", type=int, help="bins of the streaming voxel AUROC (default 65536)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    """Run the screen and print where the results are."""
    from pipelines.outputs import system_errors_as_input_errors
    from pipelines.screen import run_screen
    from pipelines.screen_config import resolve_config

    config = resolve_config(args.config, **{name: getattr(args, name) for name in _OVERRIDES})
    with system_errors_as_input_errors():
        result = run_screen(args.input, args.out, config, labels_dir=args.labels, force=args.force)
    print(f"screened {len(result.rows)} {result.report['kind'].upper()} inputs; most suspicious:")
    for row in result.rows[: min(5, len(result.rows))]:
        print(f"  {row.rank:>3}  {row.id}  {row.score:.5g}")
    metrics = result.metrics
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith(("threshold", "bound"))}
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for warning in result.report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"report: {result.report_html}")
    return 0
