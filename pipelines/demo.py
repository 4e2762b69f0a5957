"""`volscan demo`: a small phantom cohort, screened end to end, offline, in a few minutes on a CPU.

What it runs: `generate_cohort` (default 10 healthy, 3 random-lesion and 3 consistent-lesion
subjects on a 64^3 procedural head, ~3 mm voxels, lesions of 10-18 mm radius) into OUT/cohort, then `run_screen` on
OUT/cohort/images with the phantom's own template and labels into OUT/screen, with its token
cache in OUT/cache so the demo leaves nothing behind elsewhere.

A fresh machine has no pretrained DINOv2 weights and no network, so unless `weights` is given
the backbone is a ViT-S/14-shaped DINOv2 model with RANDOM weights: the run shows the pipeline
(preprocessing, tokens, CoDeGraph, maps, metrics, report) working, not what the method can
detect; the terminal and the report say so. With `weights=PATH` (a DINOv2 ViT-S/14 file, or
another backbone named by `backbone`) the same command gives meaningful scores.

Defaults (chosen for a 2-core laptop; token extraction dominates and grows with the cube edge
cubed): 16 subjects (the 3-subject consistent group stays a minority, as CoDeGraph requires),
cube 56 (a 4^3 token grid, each token ~37 mm of brain), so the phantom's lesions are made a
little larger than `volscan phantom`'s default (10-18 mm outer radius) to span about a token.
Measured: docs/demo.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.phantom import Cohort, LesionSettings, PhantomConfig, generate_cohort
from volumetric.errors import VolscanError

if TYPE_CHECKING:
    from pipelines.screen import ScreenResult

log = logging.getLogger(__name__)

DEMO_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
DEMO_COHORT = PhantomConfig(n_normal=10, n_lesion=3, n_consistent=3, seed=0, size=64, template="procedural",
                            lesions=LesionSettings(radius_mm=(10.0, 18.0)))
DEMO_CUBE = 56
RANDOM_NOTICE = ("NOTE: no pretrained weights were given, so the backbone has RANDOM weights. This demo shows the "
                 "pipeline working end to end; its scores say nothing about what volscan detects. "
                 "Pass --weights PATH (a DINOv2 ViT-S/14 checkpoint) for meaningful scores.")


@dataclass
class DemoResult:
    """Where the demo wrote its cohort and screen run, and the screen's result."""

    cohort: Cohort
    screen: "ScreenResult"

    @property
    def report_html(self) -> Path:
        """The page to open."""
        return self.screen.report_html


def run_demo(out_dir: str | Path = "volscan-demo", *, weights: str | None = None, backbone: str = DEMO_BACKBONE,
             cohort: PhantomConfig = DEMO_COHORT, size: int = DEMO_CUBE, device: str = "auto", force: bool = False,
             backbone_kwargs: dict | None = None, progress: bool = True) -> DemoResult:
    """Generate the demo cohort into OUT/cohort and screen it into OUT/screen (cache in OUT/cache).

    `weights`: None -> random weights (pipeline demonstration only), else a local weights file
    for `backbone`. `backbone_kwargs` build smaller timm models (tests). Refuses an existing
    OUT unless `force`, and `force` only replaces a previous demo.
    """
    from pipelines.screen import run_screen
    from pipelines.screen_config import ScreenConfig

    out = Path(out_dir)
    if out.exists():
        if not force:
            raise VolscanError(f"{out}: already exists; use --force to replace a previous demo, or -o another folder")
        if any(out.iterdir()) and not (out / "cohort" / "cohort.json").is_file():
            raise VolscanError(f"{out}: --force only replaces a previous demo folder (no cohort/cohort.json here); "
                               "refusing to delete other files")
    if weights is None:
        log.warning(RANDOM_NOTICE)
    made = generate_cohort(out / "cohort", cohort, force=force, progress=progress)
    config = ScreenConfig(method="codegraph", backbone=backbone, weights=weights or "random", size=size,
                          device=device, template=str(made.template_dir), cache=str(out / "cache"),
                          backbone_kwargs=dict(backbone_kwargs or {}))
    result = run_screen(made.images_dir, out / "screen", config, labels_dir=made.labels_dir, force=force)
    return DemoResult(made, result)
