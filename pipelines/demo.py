"""`volscan demo`: a small phantom cohort, screened end to end, offline, in about a minute on a CPU.

What it runs: `generate_cohort` into OUT/cohort, then `run_screen` on OUT/cohort/images with the
phantom's own template and labels into OUT/screen, with its token cache in OUT/cache so the demo
leaves nothing behind elsewhere. The cohort is the look-alike regime of the BraTS-METS vs IXI
experiment: 12 healthy scans and 6 (a third) with 1-3 look-alike lesions of 12-20 mm radius at
random places, on the skull-stripped procedural head (64^3, ~3 mm voxels) and co-registered to it
as a BraTS release is (residual pose differences only), so it is screened with `--registered
--skull-stripped` and no registration runs.

Features: by default the weights-free classical tokenizer (`--backbone classical`,
`volumetric.classical_tokens`: intensity and texture statistics per cube), because a fresh
machine has no pretrained weights and no network, and random ViT weights detect nothing: the
demo then shows *detection*, not only the pipeline. The ViT path is one option away
(`backbone=DEMO_VIT_BACKBONE`, with `weights=PATH` for meaningful scores; without weights it runs
on RANDOM weights and says so loudly). The console and the report name the features used.

Defaults (why, with the measurements: docs/demo.md): cube 84 (a 6^3 token grid, ~25 mm per
token); lesion contrast 1.5 (clearly brighter than CSF, so that a cohort this small, whose
look-alike lesions vouch for each other, ranks every lesion scan first, in the demo and in the
smaller cohort of its test); CoDeGraph scoring, as `volscan screen`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
import pipelines.screen  # called through the module: tests stand in for `run_screen`
from pipelines.phantom import Cohort, LesionSettings, PhantomConfig, WarpSettings, generate_cohort
from pipelines.plan import check_settings
from pipelines.run_folder import check_output_dir, write_run_marker
from pipelines.screen import ScreenResult
from pipelines.screen_config import CLASSICAL_BACKBONE, ScreenConfig

log = logging.getLogger(__name__)

DEMO_BACKBONE = "classical"
DEMO_VIT_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
# Co-registered scans, as in a BraTS release: the residual pose differences of a rigid registration.
DEMO_WARPS = WarpSettings(rotation_deg=2.0, scale_range=(0.97, 1.03), shift_mm=2.0, elastic_mm=2.0)
DEMO_COHORT = PhantomConfig(n_normal=12, n_lesion=0, n_consistent=0, n_lookalike=6, lookalike_lesions=(1, 3), seed=0,
                            size=64, template="procedural", skull_stripped=True, warps=DEMO_WARPS,
                            lesions=LesionSettings(radius_mm=(12.0, 20.0), contrast=1.5))
DEMO_CUBE = 84
RANDOM_NOTICE = ("NOTE: the ViT backbone has RANDOM weights (no --weights given). This run shows the ViT "
                 "pipeline working end to end; its scores say nothing about what volscan detects. "
                 "Pass --weights PATH (a DINOv2 ViT-S/14 checkpoint) for meaningful ViT scores, or run the "
                 "default classical features.")


@dataclass
class DemoResult:
    """Where the demo wrote its cohort and screen run, and the screen's result."""

    cohort: Cohort
    screen: "ScreenResult"

    @property
    def report_html(self) -> Path:
        """The page to open."""
        return self.screen.report_html


def run_demo(out_dir: str | Path = "volscan-demo", *, backbone: str = DEMO_BACKBONE, weights: str | None = None,
             cohort: PhantomConfig = DEMO_COHORT, size: int = DEMO_CUBE, device: str = "auto", force: bool = False,
             backbone_kwargs: dict | None = None, progress: bool = True) -> DemoResult:
    """Generate the demo cohort into OUT/cohort and screen it into OUT/screen (cache in OUT/cache).

    `backbone`: "classical" (default, weights-free features) or a timm ViT name; `weights`: for a
    ViT, a local weights file, None -> RANDOM weights (pipeline demonstration only).
    `backbone_kwargs` build smaller timm models (tests). Refuses an existing OUT unless `force`,
    and `force` only replaces a previous demo.
    """
    classical = backbone == CLASSICAL_BACKBONE
    config = ScreenConfig(method="codegraph", backbone=backbone, weights=weights if classical else weights or "random",
                          size=size, device=device, registered=True, skull_stripped=True,
                          backbone_kwargs=dict(backbone_kwargs or {}))
    checked = check_settings(config)  # a settings typo is the first error, before OUT and the phantom
    out = check_output_dir(out_dir, force, command="demo")
    out.mkdir(parents=True, exist_ok=True)
    # First, so --force may replace a demo that failed part-way; marked finished only at the end.
    write_run_marker(out, "demo", complete=False)
    if not classical and weights is None:
        log.warning(RANDOM_NOTICE)
    made = generate_cohort(out / "cohort", cohort, force=force, progress=progress)
    # Neither setting is part of step 1 of the plan (the template is resolved with the inputs).
    checked = replace(checked, config=replace(config, template=str(made.template_dir), cache=str(out / "cache")))
    result = pipelines.screen.run_screen(made.images_dir, out / "screen", checked, labels_dir=made.labels_dir, force=force)
    write_run_marker(out, "demo")
    return DemoResult(made, result)
