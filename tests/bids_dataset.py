"""A tiny BIDS dataset for the BIDS tests: three participants x two sessions, T1w and T2w
(32^3 volumes of test_screen's phantom brain on its template's world grid), one session with
two T1w runs, one T1w with a bright lesion."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from test_screen import SHAPE, WORLD, _brain, _world_grid

# (participant, session, entities between ses and the suffix) of each T1w scan.
T1W_SCANS = [("01", "01", ""), ("01", "02", ""), ("02", "01", ""), ("02", "02", ""), ("03", "01", "_acq-fast"),
             ("03", "02", "_run-1"), ("03", "02", "_run-2")]
T1W_IDS = sorted(f"sub-{s}_ses-{e}{x}" for s, e, x in T1W_SCANS)
LESION_ID = "sub-02_ses-02"


def write_volume(path: Path, rng: np.random.Generator, lesion: bool, contrast: float) -> None:
    world = _world_grid(WORLD, SHAPE)
    brain = _brain(world)
    image = np.where(brain, 80 + contrast * np.cos(world[..., 0] / 3) + rng.normal(0, 4, SHAPE), 0)
    if lesion:
        image[(((world - np.array([-4.0, 3.0, 2.0])) ** 2).sum(-1) <= 9) & brain] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), WORLD), str(path))


def make_bids_dataset(root: Path, seed: int = 0) -> Path:
    """The dataset under `root` (dataset_description.json, participants.tsv, sub-*/ses-*/anat)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "phantom", "BIDSVersion": "1.10.0"}),
                                                   encoding="utf-8")
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n", encoding="utf-8")
    for sub, ses, extra in T1W_SCANS:
        anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
        sid = f"sub-{sub}_ses-{ses}{extra}"
        write_volume(anat / f"{sid}_T1w.nii.gz", rng, sid == LESION_ID, 20.0)
        if not extra:
            write_volume(anat / f"{sid}_T2w.nii.gz", rng, False, -15.0)
    return root
