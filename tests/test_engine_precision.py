"""Matrix-product kernels and reduced precision made exact where it matters (highest scores)."""

from __future__ import annotations

import math

import pytest
import torch

from volumetric.engine import EngineOptions, mutual_scores
from volumetric.engine import gemm
from volumetric.engine.distances import collection_minima, element_minima
from volumetric.engine.mutual import PEAK_CANDIDATES, highest_elements, refine_highest
from volumetric.engine.partners import plan_pairs
from volumetric.errors import VolscanError


def unit_batch(n: int, m: int, c: int, seed: int, void: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, m, c, generator=g), dim=-1)
    valid = torch.rand(n, m, generator=g) >= void
    valid[:, 0] = True
    return feats, valid


@pytest.mark.parametrize("onednn", [True, False])
def test_products_equal_a_float64_reference(monkeypatch, onednn):
    if not onednn:  # the fallback (torch.mm) gives the same products
        monkeypatch.setattr(gemm, "_onednn_agrees", lambda: False)
    else:  # where torch has oneDNN (x86 wheels), its float32 kernel is the one in use
        assert gemm._onednn_agrees() == torch.backends.mkldnn.is_available()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 77, generator=g), torch.randn(41, 77, generator=g)
    buffer = torch.empty(300 * 41)
    expected = a.double() @ b.double().T
    got = gemm.rows_by_columns(a, b, buffer)
    assert got.shape == (300, 41) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    half = gemm.rows_by_columns(a.bfloat16(), b.bfloat16(), torch.empty(300 * 41, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert float((half.double() - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_exact_rows_equal_the_full_fp32_run():
    feats, valid = unit_batch(7, 40, 24, seed=5)
    layers = [feats, feats.flip(-1) * 0.5]
    partners = ~torch.eye(7, dtype=torch.bool)
    partners[0, 3] = partners[3, 0] = False  # a pair left out by a plan
    full = collection_minima(layers, valid, partners=partners, options=EngineOptions(progress=False))
    chosen = torch.tensor([0, 5, 41, 100, int(valid.sum()) - 1])
    rows = element_minima(layers, valid, chosen, partners=partners, options=EngineOptions(precision="bf16"))
    assert torch.equal(torch.isinf(rows), torch.isinf(full.distances[chosen]))
    finite = torch.isfinite(rows)
    torch.testing.assert_close(rows[finite], full.distances[chosen][finite], rtol=1e-5, atol=1e-6)
    chunked = element_minima(layers, valid, chosen, partners=partners, options=EngineOptions(block_mb=1e-4))
    torch.testing.assert_close(chunked, rows, rtol=1e-6, atol=1e-7)  # rows a few at a time


@pytest.mark.parametrize("kernel", ["onednn", "torch.mm"])
def test_exact_rows_by_blocks_of_rows_and_partner_collections(kernel, monkeypatch):
    """Blocks of 1 to all rows x 1 to 4 partner collections, a subset plan (rows of other subsets
    must not be paired), an empty collection, two layers; blocks smaller than one collection."""
    if kernel == "torch.mm":
        monkeypatch.setattr(gemm, "_onednn_agrees", lambda: False)
    n, m = 9, 30
    feats, valid = unit_batch(n, m, 16, seed=7)
    valid[4] = False  # an empty collection
    layers = [feats, feats.roll(1, -1) * 0.5]
    partners = plan_pairs(n, subsets=3, seed=0).partners
    full = collection_minima(layers, valid, partners=partners, options=EngineOptions(progress=False))
    width = int(valid.sum(1).max())
    subset = partners[0].clone()
    subset[0] = True
    for chosen in (torch.nonzero(subset[full.owner]).flatten(), torch.arange(0, len(full.owner), 3),
                   torch.arange(len(full.owner))):
        expected = full.distances[chosen]
        finite = torch.isfinite(expected)
        for floats in (width // 2, width, 5 * width, *(k * len(chosen) * width for k in (2, 3, 4))):
            got = element_minima(layers, valid, chosen, partners=partners,
                                 options=EngineOptions(block_mb=floats * 4 / 2**20))
            assert torch.equal(torch.isinf(got), ~finite), floats
            torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=0)
    nothing = element_minima(layers, valid, torch.empty(0, dtype=torch.long))
    assert nothing.shape == (0, n)


def plain_highest(
    scores: list[float], counts: list[int], share: float, among: list[bool], margin: float = 1.0
) -> list[int]:
    """Reference: sort the eligible elements of the batch, then of each collection, by score
    (NaN last)."""
    def order(i: int) -> float:
        return math.inf if math.isnan(scores[i]) else -scores[i]

    eligible = [i for i, ok in enumerate(among) if ok]
    chosen = set(sorted(eligible, key=order)[: math.ceil(margin * share * len(eligible))])
    start = 0
    for count in counts:
        group = [i for i in range(start, start + count) if among[i]]
        most = min(len(group), max(math.ceil(share * len(group)), PEAK_CANDIDATES))
        chosen |= set(sorted(group, key=order)[:most])
        start += count
    return sorted(chosen)


@pytest.mark.parametrize("restricted, margin", [(False, 1.0), (True, 1.0), (False, 2.0)])
def test_highest_elements_per_batch_and_per_collection(restricted, margin):
    g = torch.Generator().manual_seed(8)
    counts = torch.tensor([40, 25, 0, 3, 60])  # an empty and a tiny collection
    scores = torch.rand(int(counts.sum()), generator=g)
    scores[41] = math.nan
    among = torch.rand(len(scores), generator=g) > 0.4 if restricted else torch.ones(len(scores), dtype=torch.bool)
    got = highest_elements(scores, counts, 0.05, among if restricted else None, margin).tolist()
    assert got == plain_highest(scores.tolist(), counts.tolist(), 0.05, among.tolist(), margin)
    assert 41 not in got


def test_bf16_scores_are_exact_at_the_top():
    feats, valid = unit_batch(10, 90, 48, seed=11)
    exact = mutual_scores(feats, 0.3, valid, options=EngineOptions(progress=False))
    plain = mutual_scores(feats, 0.3, valid, options=EngineOptions(precision="bf16", exact_top=0, progress=False))
    refined = mutual_scores(feats, 0.3, valid, options=EngineOptions(precision="bf16", progress=False))
    peaks = [s.nan_to_num(-1.0).amax(1) for s in (exact, plain, refined)]
    assert not torch.allclose(peaks[1], peaks[0], rtol=1e-5, atol=0)  # bf16 alone moves the peaks
    torch.testing.assert_close(peaks[2], peaks[0], rtol=1e-5, atol=0)  # refined: exact collection scores
    top = math.ceil(0.01 * int(valid.sum()))
    exact_top = exact[valid].topk(top)
    torch.testing.assert_close(refined[valid][exact_top.indices], exact_top.values, rtol=1e-5, atol=0)
    assert set(refined[valid].topk(top).indices.tolist()) == set(exact_top.indices.tolist())
    rest = ((refined[valid] - exact[valid]).abs() / exact[valid]).max()
    assert 0 < rest < 2e-3  # elsewhere bf16 stays bf16


@pytest.mark.parametrize("value", [-0.1, 1.5, "all", True])
def test_bad_exact_top_is_refused(value):
    with pytest.raises(VolscanError, match="exact_top"):
        EngineOptions(exact_top=value)


def test_nothing_is_refined_where_the_products_already_were_fp32(caplog):
    feats, valid = unit_batch(6, 40, 16, seed=2)
    options = EngineOptions(device="cpu", precision="fp16", progress=False)  # falls back to fp32 on a CPU
    minima = collection_minima([feats], valid, options=options)
    assert minima.precision == "fp32"
    k = torch.full((6,), 2)
    assert len(refine_highest([feats], minima, k, partners=None, options=options)) == 0
    half = collection_minima([feats], valid, options=EngineOptions(precision="bf16", progress=False))
    assert half.precision == "bf16"
    assert len(refine_highest([feats], half, k, partners=None, options=EngineOptions(precision="bf16"))) > 0
