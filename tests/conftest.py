"""Shared test fixtures: the SRI-24 atlas installed with volscan and a tiny timm ViT recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.template import BUNDLED_SRI24_DIR, SRI24_IMAGE

# A DINOv2-shaped ViT (patch 14, register-free) small enough for CPU tests; built by timm itself
# with random weights. Tests never download anything.
TINY_VIT = {"name": "vit_small_patch14_dinov2", "depth": 3, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="session")
def sri24_dir() -> Path:
    """Folder with the SRI-24 T1 atlas (with and without skull): volscan's own package data."""
    if not (BUNDLED_SRI24_DIR / SRI24_IMAGE).is_file():
        pytest.fail(f"SRI-24 atlas not found at {BUNDLED_SRI24_DIR}; the install left volscan's package data out")
    return BUNDLED_SRI24_DIR


@pytest.fixture(scope="session")
def tiny_vit_spec() -> dict:
    """Keyword arguments for `volumetric.backbones.create_backbone` giving a tiny random ViT."""
    return dict(TINY_VIT)
