"""The 2D benchmark family (`pipelines.phantom.textures`): counts, determinism, masks that mark
the planted pixels, files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.images2d import load_image
from pipelines.labels import read_mask
from pipelines.phantom.textures import (
    DEFECT_KINDS,
    TEXTURE_KINDS,
    TextureSettings,
    texture_cohort,
    write_texture_cohort,
)
from volumetric.errors import VolscanError


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_texture_cohort_counts_masks_and_determinism(kind: str) -> None:
    settings = TextureSettings(kind=kind, n_normal=8, n_defect=6, size=56, seed=3)
    cohort = texture_cohort(settings)
    assert cohort.images.shape == (14, 56, 56, 3) and cohort.images.dtype == np.float32
    assert 0.0 <= cohort.images.min() and cohort.images.max() <= 1.0
    assert int(cohort.labels.sum()) == 6 and sorted(d for d in cohort.defects if d) == sorted(DEFECT_KINDS * 2)
    assert all(bool(m.any()) == bool(d) for m, d in zip(cohort.masks, cohort.defects))
    assert int(cohort.variant.sum()) == round(0.2 * 8) + round(0.2 * 6)
    assert len(set(cohort.ids)) == 14
    again = texture_cohort(settings)
    np.testing.assert_array_equal(again.images, cohort.images)
    np.testing.assert_array_equal(again.masks, cohort.masks)
    other = texture_cohort(TextureSettings(kind=kind, n_normal=8, n_defect=6, size=56, seed=4))
    assert not np.array_equal(other.images, cohort.images)


def test_defects_change_the_masked_pixels() -> None:
    """Same seed and draws with strength 1 vs 2: only masked pixels differ (clipping aside)."""
    weak = texture_cohort(TextureSettings(kind="noise", n_normal=2, n_defect=3, size=56, seed=0))
    strong = texture_cohort(TextureSettings(kind="noise", n_normal=2, n_defect=3, size=56, seed=0, strength=2.0))
    np.testing.assert_array_equal(weak.masks, strong.masks)
    changed = np.abs(weak.images - strong.images).max(axis=-1) > 1e-6
    assert not (changed & ~weak.masks).any() and changed.sum() > 0.5 * weak.masks.sum()


def test_write_texture_cohort(tmp_path: Path) -> None:
    settings = TextureSettings(kind="cells", n_normal=3, n_defect=2, size=42, seed=1)
    cohort = texture_cohort(settings)
    images, labels = write_texture_cohort(cohort, tmp_path / "cohort", settings)
    assert sorted(p.stem for p in images.iterdir()) == sorted(cohort.ids)
    assert sorted(p.stem for p in labels.iterdir()) == sorted(i for i, d in zip(cohort.ids, cohort.defects) if d)
    for sid, image, mask in zip(cohort.ids, cohort.images, cohort.masks):
        assert np.abs(load_image(images / f"{sid}.png") - image).max() <= 0.5 / 255 + 1e-6
        if mask.any():
            np.testing.assert_array_equal(read_mask(labels / f"{sid}.png", "2d"), mask)
    facts = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert facts["settings"]["kind"] == "cells" and facts["defects"] == dict(zip(cohort.ids, cohort.defects))
    with Image.open(images / f"{cohort.ids[0]}.png") as picture:
        assert picture.mode == "RGB" and picture.size == (42, 42)


def test_texture_settings_refuse_bad_values() -> None:
    with pytest.raises(VolscanError, match="kind"):
        TextureSettings(kind="wood")
    with pytest.raises(VolscanError, match="strength"):
        TextureSettings(strength=0.0)
