"""Synthetic brain-MRI cohorts with known lesions (`volscan phantom`).

`generate_cohort(out_dir, PhantomConfig(...))` writes images, labels, the phantom's own template
and `cohort.json`; `Cohort.load(out_dir)` reads one back. See `cohort.py` for the layout.
"""

from .anatomy import Anatomy, AtrophySettings, procedural_head
from .cohort import CONTRASTS, GROUPS, Cohort, PhantomConfig, generate_cohort, lookalike_config
from .lesions import Lesion, LesionSettings
from .sites import Site, SiteSettings
from .warps import WarpSettings

__all__ = ["CONTRASTS", "GROUPS", "Anatomy", "AtrophySettings", "Cohort", "Lesion", "LesionSettings", "PhantomConfig",
           "Site", "SiteSettings", "WarpSettings", "generate_cohort", "lookalike_config", "procedural_head"]
