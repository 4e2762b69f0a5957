"""LNAMD on 2D and 3D grids against an explicit neighbourhood loop; void tokens never mix in."""

from __future__ import annotations

import itertools

import pytest
import torch

from volumetric.engine import lnamd
from volumetric.errors import VolscanError


def reference_lnamd(x: torch.Tensor, r: int, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid in-grid neighbours within r // 2 on every axis, then L2-normalised."""
    out = torch.zeros_like(x)
    grid = x.shape[1:-1]
    h = r // 2
    for n in range(x.shape[0]):
        for index in itertools.product(*(range(s) for s in grid)):
            if not valid[(n, *index)]:
                continue
            ranges = [range(max(0, i - h), min(s, i + h + 1)) for i, s in zip(index, grid)]
            members = [x[(n, *nb)] for nb in itertools.product(*ranges) if valid[(n, *nb)]]
            out[(n, *index)] = torch.nn.functional.normalize(torch.stack(members).mean(0), dim=0)
    return out


@pytest.mark.parametrize("grid", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("r", [1, 3, 5])
def test_matches_neighbourhood_loop_with_void(grid, r):
    g = torch.Generator().manual_seed(len(grid) * 10 + r)
    x = torch.randn(2, *grid, 4, generator=g)
    valid = torch.rand(2, *grid, generator=g) > 0.3
    actual = lnamd(x, r, valid)
    torch.testing.assert_close(actual, reference_lnamd(x, r, valid), rtol=1e-5, atol=1e-6)
    assert (actual[~valid] == 0).all()


def test_void_values_do_not_leak():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, 6, generator=g)
    valid = torch.rand(2, 4, 4, 4, generator=g) > 0.4
    changed = x.clone()
    changed[~valid] = 1e6
    torch.testing.assert_close(lnamd(changed, 5, valid), lnamd(x, 5, valid))


def test_r1_only_normalises_and_no_mask_means_all_valid():
    x = torch.randn(3, 4, 5, 7)
    torch.testing.assert_close(lnamd(x, 1), torch.nn.functional.normalize(x, dim=-1))
    torch.testing.assert_close(lnamd(x, 3), lnamd(x, 3, torch.ones(3, 4, 5, dtype=torch.bool)))


@pytest.mark.parametrize(
    "x, r, valid, message",
    [
        (torch.randn(2, 3, 4), 3, None, "expected"),
        (torch.randn(2, 3, 3, 3, 3, 4), 3, None, "expected"),
        (torch.randn(2, 3, 3, 4), 2, None, "odd positive"),
        (torch.randn(2, 3, 3, 4), 0, None, "odd positive"),
        (torch.randn(2, 3, 3, 4), 3, torch.ones(2, 3, 4, dtype=torch.bool), "valid"),
    ],
)
def test_bad_input(x, r, valid, message):
    with pytest.raises(VolscanError, match=message):
        lnamd(x, r, valid)
