"""LNAMD against MuSc's own formulation (2D) and an explicit void-aware neighbourhood loop (2D, 3D);
void tokens never mix in."""

from __future__ import annotations

import itertools

import pytest
import torch

from volumetric.engine import lnamd
from volumetric.errors import VolscanError


def musc_lnamd(x: torch.Tensor, r: int) -> torch.Tensor:
    """MuSc's `LNAMD._embed` for one layer, written from its code: LayerNorm over (C, H, W),
    Unfold with zero padding, adaptive average pooling of each (C, r, r) patch to C, L2 norm."""
    n, h, w, c = x.shape
    maps = torch.nn.LayerNorm([c, h, w])(x.permute(0, 3, 1, 2))  # unit weight, zero bias
    if r > 1:
        patches = torch.nn.Unfold(kernel_size=r, stride=1, padding=(r - 1) // 2)(maps)  # (n, c r r, h w)
        patches = patches.reshape(n, c, r, r, h * w).permute(0, 4, 1, 2, 3).reshape(n * h * w, 1, -1)
        tokens = torch.nn.functional.adaptive_avg_pool1d(patches, c).reshape(n, h, w, c)
    else:
        tokens = maps.permute(0, 2, 3, 1)
    return tokens / tokens.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_equals_musc_on_random_2d_maps(r):
    x = 3.0 * torch.randn(3, 7, 6, 16, generator=torch.Generator().manual_seed(r)) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(lnamd(x, r), musc_lnamd(x, r), rtol=1e-5, atol=1e-5)


def reference_lnamd(x: torch.Tensor, r: int, valid: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """LayerNorm statistics over the valid tokens of each collection, then the mean over valid
    in-grid neighbours within r // 2 on every axis, L2-normalised. `shift`: each axis's window
    of r tokens is moved inside the grid instead (start clamped to [0, n - r]; whole axis if n < r)."""
    out = torch.zeros_like(x)
    grid = x.shape[1:-1]
    h = r // 2
    for n in range(x.shape[0]):
        kept = x[n][valid[n]].double()
        normed = (x[n].double() - kept.mean()) / torch.sqrt(kept.var(unbiased=False) + 1e-5)
        for index in itertools.product(*(range(s) for s in grid)):
            if not valid[(n, *index)]:
                continue
            if shift:
                starts = [min(max(i - h, 0), max(s - r, 0)) for i, s in zip(index, grid)]
                ranges = [range(a, min(a + r, s)) for a, s in zip(starts, grid)]
            else:
                ranges = [range(max(0, i - h), min(s, i + h + 1)) for i, s in zip(index, grid)]
            members = [normed[nb] for nb in itertools.product(*ranges) if valid[(n, *nb)]]
            out[(n, *index)] = torch.nn.functional.normalize(torch.stack(members).mean(0), dim=0).float()
    return out


@pytest.mark.parametrize("grid", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("r", [1, 3, 5])
def test_matches_neighbourhood_loop_with_void(grid, r):
    g = torch.Generator().manual_seed(len(grid) * 10 + r)
    x = torch.randn(2, *grid, 4, generator=g) + 1.0
    valid = torch.rand(2, *grid, generator=g) > 0.3
    actual = lnamd(x, r, valid)
    torch.testing.assert_close(actual, reference_lnamd(x, r, valid), rtol=1e-5, atol=1e-5)
    assert (actual[~valid] == 0).all()


@pytest.mark.parametrize("grid", [(5, 6), (2, 7), (3, 4, 5)])
@pytest.mark.parametrize("r", [1, 3, 5])
def test_shifted_border_matches_neighbourhood_loop_with_void(grid, r):
    """border="shift": every window holds r tokens per axis (fewer only where the axis is shorter)."""
    g = torch.Generator().manual_seed(len(grid) * 100 + r)
    x = torch.randn(2, *grid, 4, generator=g) + 1.0
    valid = torch.rand(2, *grid, generator=g) > 0.3
    actual = lnamd(x, r, valid, border="shift")
    torch.testing.assert_close(actual, reference_lnamd(x, r, valid, shift=True), rtol=1e-5, atol=1e-5)
    assert (actual[~valid] == 0).all()
    # Away from the grid's edge both borders agree; MuSc's zero padding stays the default.
    inner = (slice(None),) + tuple(slice(r // 2, n - r // 2) for n in grid)
    torch.testing.assert_close(actual[inner], lnamd(x, r, valid)[inner])
    torch.testing.assert_close(lnamd(x, r, valid, border="zero"), lnamd(x, r, valid))


def test_void_values_do_not_leak():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, 6, generator=g)
    valid = torch.rand(2, 4, 4, 4, generator=g) > 0.4
    changed = x.clone()
    changed[~valid] = 1e6
    torch.testing.assert_close(lnamd(changed, 5, valid), lnamd(x, 5, valid))


def test_layer_norm_switch_and_no_mask_means_all_valid():
    x = torch.randn(3, 4, 5, 7) + 2.0
    torch.testing.assert_close(lnamd(x, 1, layer_norm=False), torch.nn.functional.normalize(x, dim=-1))
    assert not torch.allclose(lnamd(x, 1), lnamd(x, 1, layer_norm=False))
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


def test_unknown_border_is_refused():
    with pytest.raises(VolscanError, match="border"):
        lnamd(torch.randn(2, 3, 3, 4), 3, border="reflect")
