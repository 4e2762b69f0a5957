"""Shared test fixtures: the SRI-24 atlas shipped beside the repo and a tiny timm ViT recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SRI24_DIR = REPO_ROOT.parent / "shared" / "data" / "sri24"

# A DINOv2-shaped ViT (patch 14, register-free) small enough for CPU tests; built by timm itself
# with random weights. Tests never download anything.
TINY_VIT = {"name": "vit_small_patch14_dinov2", "depth": 3, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="session")
def sri24_dir() -> Path:
    """Folder with the SRI-24 T1 atlas (with and without skull); CI has it beside the clone."""
    if not (SRI24_DIR / "sri24_t1_brats.nii.gz").is_file():
        pytest.fail(f"SRI-24 atlas not found at {SRI24_DIR}; tests expect ../shared/data/sri24")
    return SRI24_DIR


@pytest.fixture(scope="session")
def tiny_vit_spec() -> dict:
    """Keyword arguments for `volumetric.backbones.create_backbone` giving a tiny random ViT."""
    return dict(TINY_VIT)
